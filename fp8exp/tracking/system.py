"""System metrics (`tracking.system_metrics`): what the MLflow UI's System metrics charts show.

MLflow's own SystemMetricsMonitor samples the machine in a background thread: `system/cpu_utilization_percentage`,
`system/system_memory_usage_{megabytes,percentage}`, `system/disk_{usage_percentage,usage_megabytes,
available_megabytes}`, `system/network_{receive,transmit}_megabytes` (psutil) and, with pynvml on
NVIDIA GPUs, `system/gpu_<i>_{utilization_percentage,memory_usage_percentage,memory_usage_megabytes,
power_usage_watts,power_usage_percentage}`. The values are machine-wide, not this process's.

Two things differ from `mlflow.start_run(log_system_metrics=True)`:
- the samples go through the run's own queue (run.py) like every other metric, never to the store
  from the thread: a server that goes away gets no calls from it, the samples wait with the rest,
  land in the offline copy and are synced from there; an offline run (tracking.required=false)
  keeps them in the offline store. They reach the store at the run's next flush (epoch end, FP8
  log point, checkpoint, heartbeat), so a chart lags by at most a minute while training.
- the step is the number of seconds since the run first started (a resumed run continues the
  axis), and the sample at the end covers the stretch since the last one, so even a run shorter
  than the sampling interval gets one point (MLflow's monitor would log none).
`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`, `MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING` and
`MLFLOW_SYSTEM_METRICS_NODE_ID` work as in MLflow.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

SAMPLING_INTERVAL_S = 10.0


def start(run, sampling_interval_s: float = SAMPLING_INTERVAL_S):
    """A started monitor logging into `run` (call its finish() before closing the run), or None
    when MLflow's monitor cannot run here (psutil missing)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as error:
        log.warning("No system metrics: %s (pip install psutil)", error)
        return None

    class QueuedMonitor(SystemMetricsMonitor):
        def __init__(self):
            super().__init__(run.run_id, sampling_interval=sampling_interval_s, tracking_uri=run.uri)
            self._start_s = run.journal.start_time / 1000

        def monitor(self):
            try:
                while True:
                    for _ in range(self.samples_before_logging):
                        if self._shutdown_event.wait(self.sampling_interval):
                            return  # finish() takes the last sample
                        self.collect_metrics()
                    self.publish_metrics(self.aggregate_metrics())
            except Exception as error:  # noqa: BLE001  (system metrics never stop a run)
                log.warning("System metrics stopped: %s", error)

        def publish_metrics(self, metrics):
            prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
            step = max(0, int(time.time() - self._start_s))
            run.log_metrics({prefix + key: value for key, value in metrics.items()}, step=step)
            for monitor in self.monitors:
                monitor.clear_metrics()

        def finish(self):
            if self._process is None:
                return
            self._shutdown_event.set()
            self._process.join(timeout=self.sampling_interval + 5)  # a wedged GPU query must not hold the run open
            stuck, self._process = self._process.is_alive(), None
            if stuck:
                return
            try:
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
            except Exception as error:  # noqa: BLE001
                log.warning("Last system metrics sample failed: %s", error)

    # MLflow says "Started monitoring system metrics" and "Skip logging GPU metrics" at INFO on every run.
    mlflow_log = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    level = mlflow_log.level
    mlflow_log.setLevel(logging.WARNING)
    try:
        monitor = QueuedMonitor()
        monitor.collect_metrics()  # the baseline: psutil's CPU share counts from its previous call
        for part in monitor.monitors:
            part.clear_metrics()
        monitor.start()
    except Exception as error:  # noqa: BLE001
        log.warning("No system metrics: %s", error)
        return None
    finally:
        mlflow_log.setLevel(level)
    return monitor
