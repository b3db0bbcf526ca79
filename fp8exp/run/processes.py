"""Several processes, one run (JAX multi-controller): which processes there are (the config's,
else the cluster's), their start (a meeting, meeting.py, then JAX's distributed runtime), and
the watch they keep on each other after: a process that fails tells process 0, which ends the
MLflow run FAILED naming it, and one that dies is noticed by its connection closing. Process 0
alone talks to MLflow."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from omegaconf import DictConfig

from fp8exp.config import ConfigError
from fp8exp.run import meeting
from fp8exp.tracking import redact

log = logging.getLogger(__name__)

NOT_COMPARED = ("distribution.process_id", "distribution.coordinator")  # may differ between processes
VERBS = {"FAILED": "failed", "KILLED": "stopped"}  # what another process did, by the status it gives the run
STOPPED_GRACE_S = 60.0  # a peer stopped at a signal: how long this process may take to stop too
SAME_ERROR_GRACE_S = 5.0
"""A peer's config error (after the meeting every process checks the same settings): how long this
process may take to reach it too and report it itself, rather than exit naming the peer."""
LEAVE_S = 30.0  # how long a process leaving for another's failure waits at JAX's shutdown barrier
_LEAVING = threading.Lock()
"""Held by whoever takes this process out of JAX's runtime: a watcher leaving for another's
failure, or the interpreter's exit (JAX's own shutdown). Two shutdown barriers from one process
cancel each other, and JAX aborts every process."""
TURN_AWAY_S = 30.0  # how long process 0, failed before the meeting, tells those coming to meet
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
    on_failure: Callable[[int, str, str], None] | None = None
    """What another process's failure (index, why, status FAILED or KILLED) does here (process 0:
    end the MLflow run); then this one exits."""
    watchers: list[threading.Thread] = field(default_factory=list)
    listener: socket.socket | None = None
    """Process 0, from its first checks to the meeting: the coordinator port, taken."""
    stopping: Callable[[], bool] = lambda: False
    """Whether this process is stopping at a signal itself (then a peer's stop waits for it)."""
    solo: bool = False
    """Past its last collective: another process's failure or stop can no longer leave it waiting."""
    settling: bool = False
    """Failed, and waiting for the watchers (settle): a peer's config error is named at once."""

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


@contextlib.contextmanager
def lead_checks(processes: Processes, timeout_s: float) -> Iterator[None]:
    """Process 0's own checks before the meeting (the tracking server, the run to resume). It
    takes the coordinator port first, so that when a check fails the processes coming to meet
    hear why at once, not after their timeout."""
    if not (processes.many and processes.lead):
        yield
        return
    processes.listener = meeting.listen(processes.coordinator)
    try:
        yield
    except BaseException as error:
        meeting.turn_away(processes.listener, processes.count - 1, _failure(error), min(timeout_s, TURN_AWAY_S))
        raise


def _failure(error: BaseException) -> dict:
    """How a failure is told to another process: its first line, and a ConfigError as itself too."""
    first = redact.text((str(error).strip().splitlines() or [""])[0])
    told = {"failed": f"{type(error).__name__}: {first}"[:1000]}
    if isinstance(error, ConfigError):
        told["error"] = [error.key, redact.text(str(error).removeprefix(f"{error.key}: "))]
    return told


def start(processes: Processes, params: dict[str, str], payload: bytes, timeout_s: float) -> bytes:
    """Meet the other processes (process 0 gives `payload`, every process gets it back), then start
    JAX's distributed runtime over all their devices. Before any JAX computation."""
    import jax

    if processes.lead:
        listener = processes.listener or meeting.listen(processes.coordinator)
        processes.listener = None
        processes.peers.update(meeting.lead(listener, processes.coordinator, processes.count, params, payload,
                                            timeout_s))
    else:
        processes.peers[0], payload = meeting.join(processes.coordinator, processes.index, params, timeout_s)
    log.info("%s: all %d processes joined at %s", processes, processes.count, processes.coordinator)
    # JAX's preemption service would take SIGTERM from fp8exp's handlers (stopping.GracefulStop):
    # a preempted or scancel-ed run must still checkpoint and end KILLED.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(processes.coordinator, processes.count, processes.index,
                               local_device_ids=processes.local_devices, initialization_timeout=max(10, int(timeout_s)))
    # Runs before JAX's own shutdown at exit (registered later): a watcher leaving goes first.
    atexit.register(lambda: _LEAVING.acquire(timeout=LEAVE_S + 5))  # kept: a later watcher leaves it to the exit
    return payload


def watch(processes: Processes) -> None:
    """A thread per connection. A process that reports a failure, or whose connection closes
    before it said it was done, calls `processes.on_failure(index, why, "FAILED")`, then this
    process exits. One that stopped at a signal stops this one too, KILLED, unless this one stops
    by itself within STOPPED_GRACE_S (it may be waiting in a collective the stopped one left); one
    with a config error, unless this one reports it too within SAME_ERROR_GRACE_S."""
    for index, conn in processes.peers.items():
        def listen(index=index, conn=conn):
            try:
                message, _ = meeting.receive(conn)
            except (OSError, ValueError):
                message = None
            message = message or {}
            alive = bool(message) and message.get("alive", True)  # it ends through JAX's shutdown barrier
            status = message.get("status", "FAILED")
            why = message.get("failed") or "it exited without a word (killed, out of memory, or its host lost)"
            if message.get("done"):
                if not message.get("stopped") or _ends_within(processes, STOPPED_GRACE_S):
                    return
                status, why = "KILLED", f"it stopped ({message['stopped']}) and this one had not"
            elif message.get("error") and _ends_within(processes, SAME_ERROR_GRACE_S, while_stopping=False):
                return
            if processes.ended or processes.solo:
                return
            try:
                if processes.on_failure is not None:
                    processes.on_failure(index, why, status)
            except BaseException:  # noqa: BLE001  (the exit below must happen: collectives would wait forever)
                log.exception("could not end the run after process %d of %d: %s", index, processes.count, why)
            finally:
                exit_for(processes, index, why, status, alive)

        thread = threading.Thread(target=listen, name=f"fp8exp-watch-{index}", daemon=True)
        thread.start()
        processes.watchers.append(thread)


def _ends_within(processes: Processes, seconds: float, while_stopping: bool = True) -> bool:
    """Does this process end (or pass its last collective) within `seconds`, or, `while_stopping`,
    at all while it is stopping at a signal itself (writing its checkpoint, closing the run)?
    Without `while_stopping`, not once it fails and settles: then the peer is named on the run."""
    deadline = time.monotonic() + seconds
    while not (processes.ended or processes.solo or (processes.settling and not while_stopping)) and (
            time.monotonic() < deadline or (while_stopping and processes.stopping())):
        time.sleep(0.2)
    return processes.ended or processes.solo


def settle(processes: Processes) -> None:
    """A failure here may be a dead peer's doing (a collective that lost it): its watcher gets a
    moment to notice, name it on the run and exit, before this process reports its own error.
    Later word from the others (the same failure, reached by all) no longer stops this one."""
    processes.settling = True
    deadline = time.monotonic() + 2.0
    for thread in processes.watchers:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    processes.ended = True


@contextlib.contextmanager
def reporting(processes: Processes) -> Iterator[None]:
    """Tell the other processes how this one ended (after `settle`, for a failure)."""
    try:
        yield
    except BaseException as error:
        if isinstance(error, STOPS):  # this process stopped itself: a peer's own stop is no failure
            processes.ended = True
        elif processes.many and not processes.ended and not isinstance(error, ConfigError):
            settle(processes)
        end(processes, error)
        raise
    end(processes)


def end(processes: Processes, error: BaseException | None = None) -> None:
    """Tell the others this process is done, or why it failed."""
    processes.ended = True
    if error is None or isinstance(error, STOPS):  # a stop (signal, Ctrl-C) ends the others' runs, not as failures
        message = {"done": True, **({"stopped": _failure(error)["failed"]} if error else {})}
    else:
        message = _failure(error)
    _tell(processes, message)


def _tell(processes: Processes, message: dict, but: int | None = None) -> None:
    """`message` to every other process this one is connected to (but `but`), as far as it gets."""
    for index, conn in processes.peers.items():
        if index != but:
            with contextlib.suppress(OSError):
                meeting.send(conn, message)


def exit_for(processes: Processes, index: int, why: str, status: str = "FAILED", alive: bool = False) -> None:
    """Another process failed or stopped: this one cannot go on (its collectives would wait forever).
    One that is `alive` (it said so) ends through JAX's shutdown barrier: this one meets it there
    first (at most LEAVE_S), or it would wait for this one until the heartbeat timeout and abort.
    Process 0 passes the word on, so that every process leaves (and meets there) too."""
    if not _LEAVING.acquire(blocking=False):
        threading.Event().wait()  # another watcher, or this process's own exit, takes it out of JAX
    told = f"process {index} of {processes.count} {VERBS[status]}: {why}"
    print(f"fp8exp: error: {told}; {processes} stops", file=sys.stderr, flush=True)
    if processes.lead:  # the others hear only from process 0
        _tell(processes, {"failed": told, "status": status, "alive": alive}, but=index)
    if alive:
        leaving = threading.Thread(target=_leave_jax, name="fp8exp-leave", daemon=True)
        leaving.start()
        leaving.join(LEAVE_S)
    os._exit(1 if status == "FAILED" else 128 + signal.SIGTERM)


def _leave_jax() -> None:
    import jax

    try:
        jax.distributed.shutdown()
    except Exception as error:  # noqa: BLE001  (leaving anyway)
        log.debug("JAX's shutdown barrier: %s", error)
