"""Tracking observes: the MLflow store (store), one run's logging and delivery queue (run), the
run's life around training (context), Keras callbacks that feed it (callbacks), the offline copy
and its later delivery (offline), and credential masking (redact). It never imports data or
model construction."""
