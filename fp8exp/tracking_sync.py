"""`python -m fp8exp.tracking_sync`: deliver runs the tracking server could not take. The command keeps this name; the code
lives in fp8exp/tracking/offline.py."""

import sys

from fp8exp.tracking.offline import main

if __name__ == "__main__":
    sys.exit(main())
