"""Servers the tests start on 127.0.0.1 and always stop: `mlflow server` (a tracking store the
UI and the outage tests talk to) and `mlflow models serve` (a run's saved model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A command in its own process session on a free loopback port: started, probed until its
    health URL answers, stopped with every process it spawned. Can stop and start again on the
    same port (the outage tests)."""

    def __init__(self, command: list[str], log: Path, health: str, env: dict | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.log, self.health, self.cwd = log, health, cwd
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Server":
        with self.log.open("a") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.cwd, start_new_session=True)
        return self.wait_ready() if wait else self

    def wait_ready(self, timeout_s: float = 240) -> "Server":
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}{self.health}", timeout=2).close()
                return self
            except (urllib.error.URLError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.command[:3]} did not come up:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.25)

    def ensure_up(self) -> "Server":
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the CLI and the uvicorn workers it started
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def tracking_server(store: Path, artifacts: Path, log: Path, cwd: Path | None = None) -> Server:
    """`mlflow server` on a SQLite store, as `make ui` serves the default one."""
    return Server([MLFLOW, "server", "--host", "127.0.0.1", "--port", "{port}", "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts)],
                  log, "/health", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                                       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}, cwd=cwd)


def model_server(tracking_uri: str, model_uri: str, log: Path) -> Server:
    """`mlflow models serve` in this environment (uvicorn must be on PATH)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return Server([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                   "--host", "127.0.0.1", "--port", "{port}"],
                  log, "/ping", env={"MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}, cwd=log.parent)
