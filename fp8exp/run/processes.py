"""Several processes, one run (JAX multi-controller). Before JAX starts, the processes meet at
process 0's coordinator address over a plain socket: JAX's own start-up aborts the process (a C++
check, no Python error) when a peer is missing, so this handshake is where a wrong address, a
missing process or a different config is one clear line. Process 0 checks every config against
its own and hands out what all need (the checkpoint to resume from); then the socket is given
back to JAX's coordination service, and the open connections stay as a watch: a process that
fails tells process 0, which ends the MLflow run FAILED naming it, and one that dies is noticed
by its connection closing. Process 0 alone talks to MLflow."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from omegaconf import DictConfig

from fp8exp.config import ConfigError
from fp8exp.tracking import redact

log = logging.getLogger(__name__)

NOT_COMPARED = ("distribution.process_id", "distribution.coordinator")  # may differ between processes
STOPS = (KeyboardInterrupt,)
"""A process stopping at a signal (stopping.Interrupted is one: it checkpoints, its run ends
KILLED) or at Ctrl-C: not a failure to report."""


@dataclass
class Processes:
    """Where this process stands: its index, how many there are, process 0's address."""

    index: int = 0
    count: int = 1
    coordinator: str | None = None
    local_devices: list[int] | None = None
    """The cluster's choice of this process's devices (SLURM: one GPU per task); None = all."""
    peers: dict[int, socket.socket] = field(default_factory=dict)
    """Process 0: a connection per other process; the others: {0: the connection to process 0}."""
    ended: bool = False
    on_failure: Callable[[int, str], None] | None = None
    """What another process's failure does here (process 0: end the MLflow run); then this one exits."""
    watchers: list[threading.Thread] = field(default_factory=list)

    @property
    def lead(self) -> bool:
        return self.index == 0

    @property
    def many(self) -> bool:
        return self.count > 1

    def __str__(self) -> str:
        return f"process {self.index} of {self.count}"


def count() -> int:
    """How many processes train this run (1 until JAX's distributed runtime started)."""
    import jax

    return jax.process_count()


def detect(distribution: DictConfig) -> Processes:
    """The config's processes, else the cluster's (SLURM with several tasks...), else one
    (`distribution.num_processes=1` opts out of the cluster's)."""
    if distribution.get("num_processes") is not None and distribution.num_processes > 1:
        return Processes(distribution.process_id, distribution.num_processes, distribution.coordinator)
    local = os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")  # hydra/launcher=submitit_local with tasks_per_node > 1
    if distribution.get("num_processes") is None and int(local) > 1 and "SUBMITIT_LOCAL_GLOBALID" in os.environ:
        port = os.environ.get("JAX_COORDINATOR_PORT") or 20000 + int(os.environ["SUBMITIT_LOCAL_JOB_ID"]) % 20000
        return Processes(int(os.environ["SUBMITIT_LOCAL_GLOBALID"]), int(local), f"127.0.0.1:{port}")
    if distribution.get("num_processes") is None:
        try:  # JAX's own cluster detection (SLURM, Open MPI, Kubernetes...): what it would use
            from jax._src.clusters import ClusterEnv

            address, total, index, local = ClusterEnv.auto_detect_unset_distributed_params(
                coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None,
                cluster_detection_method=None, initialization_timeout=int(distribution.timeout_s))
        except Exception as error:  # noqa: BLE001  (a JAX without this private helper)
            log.warning("Could not ask JAX which cluster this is (%s): running as one process", error)
            address = total = None
        if total and total > 1 and address is not None:
            return Processes(index, total, address, local_devices=local)
    return Processes()


def _send(conn: socket.socket, message: dict, payload: bytes = b"") -> None:
    conn.sendall(json.dumps({**message, "payload": len(payload)}).encode() + b"\n" + payload)


def _receive(conn: socket.socket) -> tuple[dict | None, bytes]:
    """One message (a JSON line, then its payload); None when the other side closed."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    line, _, head = data.partition(b"\n")
    message = json.loads(line)
    payload = bytearray(message["payload"])  # filled in place: a checkpoint can be gigabytes
    view, filled = memoryview(payload), len(head)
    view[:filled] = head
    while filled < len(payload):
        count = conn.recv_into(view[filled:])
        if not count:
            return None, b""
        filled += count
    return message, bytes(payload)


def _differences(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    keys = sorted(k for k in set(mine) | set(theirs) if k not in NOT_COMPARED and mine.get(k) != theirs.get(k))
    return [f"{k}={theirs.get(k, '(unset)')} (process 0: {mine.get(k, '(unset)')})" for k in keys]


def _lead_meets(processes: Processes, params: dict[str, str], payload: bytes, timeout_s: float) -> None:
    port = processes.coordinator.rsplit(":", 1)[1]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", int(port)))
    except OSError as error:
        raise ConfigError("distribution.coordinator", f"process 0 cannot listen on port {port} ({error.strerror}); "
                          "choose a free port") from None
    listener.listen(processes.count)
    deadline = time.monotonic() + timeout_s
    try:
        while len(processes.peers) < processes.count - 1:
            listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                conn, _ = listener.accept()
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                hello, _ = _receive(conn)
            except (socket.timeout, OSError):
                if time.monotonic() < deadline:
                    continue
                missing = [str(i) for i in range(1, processes.count) if i not in processes.peers]
                problem = ("distribution.num_processes", f"process(es) {', '.join(missing)} of {processes.count} did "
                           f"not join at {processes.coordinator} within {timeout_s:.0f} s; start them with the same "
                           "command and their distribution.process_id")
                for other in processes.peers.values():  # those that joined stop too, saying why
                    _send(other, {"error": problem})
                raise ConfigError(*problem) from None
            if hello is None:
                continue
            problem = None
            index = hello["process_id"]
            if index in processes.peers or index == 0:
                problem = ("distribution.process_id", f"two processes have distribution.process_id={index}; "
                           f"give each of the {processes.count} a different one, 0 .. {processes.count - 1}")
            elif _differences(params, hello["params"]):
                problem = ("distribution", f"process {index} runs another config than process 0: "
                           f"{'; '.join(_differences(params, hello['params'])[:3])}; every process must run the "
                           "same command, only distribution.process_id differs")
            if problem:
                for other in [conn, *processes.peers.values()]:
                    _send(other, {"error": problem})
                raise ConfigError(*problem)
            processes.peers[index] = conn
        for conn in processes.peers.values():
            conn.settimeout(None)
            _send(conn, {"ok": True}, payload)
    finally:
        listener.close()  # the port goes to JAX's coordination service


def _peer_meets(processes: Processes, params: dict[str, str], timeout_s: float) -> bytes:
    host, port = processes.coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            wait = max(0.1, deadline - time.monotonic())
            conn = socket.create_connection((host.strip("[]"), int(port)), timeout=wait)
            break
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ConfigError("distribution.coordinator", f"no process 0 answered at {processes.coordinator} "
                                  f"within {timeout_s:.0f} s ({error.strerror or error}); start process 0 "
                                  "(distribution.process_id=0) with the same command, or fix the address") from None
            time.sleep(0.2)
    _send(conn, {"process_id": processes.index, "params": params})
    conn.settimeout(None)  # process 0 answers once all have joined (its own bounded wait)
    reply, payload = _receive(conn)
    if reply is None:
        raise ConfigError("distribution.coordinator", f"process 0 at {processes.coordinator} hung up at start-up: "
                          "see its output")
    if not reply.get("ok"):
        raise ConfigError(*reply["error"]) if "error" in reply else ConfigError(
            "distribution.coordinator", f"process 0 stopped at start-up: {reply.get('failed', reply)}")
    processes.peers[0] = conn
    return payload


def start(processes: Processes, params: dict[str, str], payload: bytes, timeout_s: float) -> bytes:
    """Meet the other processes (process 0 gives `payload`, every process gets it back), then start
    JAX's distributed runtime over all their devices. Before any JAX computation."""
    import jax

    if processes.lead:
        _lead_meets(processes, params, payload, timeout_s)
    else:
        payload = _peer_meets(processes, params, timeout_s)
    log.info("%s: all %d processes joined at %s", processes, processes.count, processes.coordinator)
    # JAX's preemption service would take SIGTERM from fp8exp's handlers (stopping.GracefulStop):
    # a preempted or scancel-ed run must still checkpoint and end KILLED.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(processes.coordinator, processes.count, processes.index,
                               local_device_ids=processes.local_devices, initialization_timeout=max(10, int(timeout_s)))
    return payload


def watch(processes: Processes) -> None:
    """A thread per connection: a process that reports a failure, or whose connection closes
    before it said it was done, calls `processes.on_failure(index, why)`, then this process exits."""
    for index, conn in processes.peers.items():
        def listen(index=index, conn=conn):
            try:
                message, _ = _receive(conn)
            except (OSError, ValueError):
                message = None
            if processes.ended or (message or {}).get("done"):
                return
            why = (message or {}).get("failed") or "it exited without a word (killed, or out of memory?)"
            if processes.on_failure is not None:
                processes.on_failure(index, why)
            exit_for(processes, index, why)

        thread = threading.Thread(target=listen, name=f"fp8exp-watch-{index}", daemon=True)
        thread.start()
        processes.watchers.append(thread)


@contextlib.contextmanager
def reporting(processes: Processes) -> Iterator[None]:
    """Tell the other processes how this one ended. A failure here may be a dead peer's doing (a
    collective that lost it): its watcher gets a moment to notice and name it first."""
    try:
        yield
    except BaseException as error:
        if isinstance(error, STOPS):  # this process stopped itself: a peer's own stop is no failure
            processes.ended = True
        elif processes.many and not isinstance(error, ConfigError):
            deadline = time.monotonic() + 2.0
            for thread in processes.watchers:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        end(processes, error)
        raise
    end(processes)


def end(processes: Processes, error: BaseException | None = None) -> None:
    """Tell the others this process is done, or why it failed."""
    processes.ended = True
    first = redact.text((str(error).strip().splitlines() or [""])[0]) if error is not None else ""
    if error is None or isinstance(error, STOPS):  # a stop (signal, Ctrl-C) ends the others' runs, not as failures
        message = {"done": True, **({"stopped": f"{type(error).__name__}: {first}"[:1000]} if error else {})}
    else:
        message = {"failed": f"{type(error).__name__}: {first}"[:1000]}
    for conn in processes.peers.values():
        try:
            _send(conn, message)
        except OSError:
            pass


def exit_for(processes: Processes, index: int, why: str) -> None:
    """Another process failed: this one cannot go on (its collectives would wait forever)."""
    print(f"fp8exp: error: {'process 0' if index == 0 else f'process {index}'} of {processes.count} failed: {why}; "
          f"{processes} stops", file=sys.stderr, flush=True)
    os._exit(1)
