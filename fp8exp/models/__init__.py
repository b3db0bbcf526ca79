"""The networks fp8exp trains, built under whatever dtype policy is global at call time."""
