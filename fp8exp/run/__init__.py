"""Running experiments: one run end to end (experiment), its training loop and step timing
(train), checkpoints and resumption (checkpoint, resume), early stops (stopping), devices
(distribution), how a job was launched (launch) and multirun sweeps (sweep)."""
