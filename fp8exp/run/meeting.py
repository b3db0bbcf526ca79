"""The start-up meeting of several processes, before JAX starts: they meet at process 0's
coordinator address over a plain socket. JAX's own start-up aborts the process (a C++ check, no
Python error) when a peer is missing, so this handshake is where a wrong address, a missing
process or a different config is one clear line. Process 0 checks every config against its own
and hands out what all need (the checkpoint to resume from); then the port is given back to JAX's
coordination service, and the open connections stay, for processes.watch. Messages are a JSON
line, then a payload of the length it gives."""

from __future__ import annotations

import json
import socket
import time

from fp8exp.config import ConfigError


KEEPALIVE = (10, 5, 3)
"""The connections stay open through training, as processes.watch's: TCP keepalive probes (after
10 s of silence, every 5 s, 3 unanswered) notice in ~25 s a host that died without closing them
(power, network), where a plain read would wait forever."""
_KEEPALIVE_OPTIONS = (getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None)),  # Linux, macOS
                      getattr(socket, "TCP_KEEPINTVL", None), getattr(socket, "TCP_KEEPCNT", None))


ANSWER_MARGIN_S = 60.0
"""Process 0 answers once all have joined (its own wait, up to timeout_s) and its checks ran: a
peer waits for the answer at most 2 x timeout_s plus this, then says so."""


def keep_alive(conn: socket.socket) -> socket.socket:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in zip(_KEEPALIVE_OPTIONS, KEEPALIVE):
        if option is not None:
            conn.setsockopt(socket.IPPROTO_TCP, option, value)
    return conn


def send(conn: socket.socket, message: dict, payload: bytes = b"") -> None:
    conn.sendall(json.dumps({**message, "payload": len(payload)}).encode() + b"\n" + payload)


def receive(conn: socket.socket) -> tuple[dict | None, bytes]:
    """One message and its payload; None when the other side closed."""
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


def listen(coordinator: str) -> socket.socket:
    """Process 0 takes the coordinator's port (every interface, IPv4 and IPv6 where it can)."""
    port = int(coordinator.rsplit(":", 1)[1])
    family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
    try:
        return socket.create_server(("", port), family=family, backlog=64, reuse_port=False,
                                    dualstack_ipv6=family == socket.AF_INET6)
    except OSError as error:
        raise ConfigError("distribution.coordinator", f"process 0 cannot listen on port {port} ({error.strerror}); "
                          "choose a free port") from None


def _differences(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    return [f"{k}={theirs.get(k, '(unset)')} (process 0: {mine.get(k, '(unset)')})" for k in keys]


def lead(listener: socket.socket, coordinator: str, count: int, params: dict[str, str], payload: bytes,
         timeout_s: float) -> dict[int, socket.socket]:
    """Process 0: wait (at most `timeout_s`) for the other processes, check that each runs its
    config, then give every one `payload`. Returns a connection per process id; closes `listener`."""
    peers: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(peers) < count - 1:
            listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                conn, _ = listener.accept()
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                hello, _ = receive(conn)
            except (socket.timeout, OSError):
                if time.monotonic() < deadline:
                    continue
                missing = [str(i) for i in range(1, count) if i not in peers]
                problem = ("distribution.num_processes", f"process(es) {', '.join(missing)} of {count} did not join "
                           f"at {coordinator} within {timeout_s:.0f} s; start them with the same command and their "
                           "distribution.process_id")
                for other in peers.values():  # those that joined stop too, saying why
                    send(other, {"error": problem})
                raise ConfigError(*problem) from None
            if hello is None:
                continue
            problem = None
            index = hello["process_id"]
            differences = _differences(params, hello["params"])
            if index in peers or index == 0:
                problem = ("distribution.process_id", f"two processes have distribution.process_id={index}; "
                           f"give each of the {count} a different one, 0 .. {count - 1}")
            elif differences:
                problem = ("distribution", f"process {index} runs another config than process 0: "
                           f"{'; '.join(differences[:3])}; every process must run the same command, only "
                           "distribution.process_id differs")
            if problem:
                for other in [conn, *peers.values()]:
                    send(other, {"error": problem})
                raise ConfigError(*problem)
            peers[index] = keep_alive(conn)
        for index, conn in peers.items():
            conn.settimeout(None)
            try:
                send(conn, {"ok": True}, payload)
            except OSError as error:
                raise ConfigError("distribution.coordinator", f"process {index} left the start-up meeting at "
                                  f"{coordinator} before it ended ({error.strerror or error}): see its output") from None
    finally:
        listener.close()  # the port goes to JAX's coordination service
    return peers


def join(coordinator: str, index: int, params: dict[str, str], timeout_s: float) -> tuple[socket.socket, bytes]:
    """Any other process: reach process 0 (retrying up to `timeout_s`), say who this is and what it
    runs, and wait for the go. Returns the connection to process 0 and what it handed out."""
    host, port = coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            wait = max(0.1, deadline - time.monotonic())
            conn = keep_alive(socket.create_connection((host.strip("[]"), int(port)), timeout=wait))
            break
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ConfigError("distribution.coordinator", f"no process 0 answered at {coordinator} "
                                  f"within {timeout_s:.0f} s ({error.strerror or error}); start process 0 "
                                  "(distribution.process_id=0) with the same command, or fix the address") from None
            time.sleep(0.2)
    answer_s = 2 * timeout_s + ANSWER_MARGIN_S
    conn.settimeout(answer_s)
    try:
        send(conn, {"process_id": index, "params": params})
        reply, payload = receive(conn)
    except socket.timeout:
        raise ConfigError("distribution.coordinator", f"process 0 at {coordinator} did not answer within "
                          f"{answer_s:.0f} s of this process connecting (still checking, or waiting for "
                          "the others): see its output") from None
    except OSError:
        reply = None
    if reply is None:
        raise ConfigError("distribution.coordinator", f"process 0 at {coordinator} hung up at start-up: "
                          "see its output")
    conn.settimeout(None)
    if "error" in reply:
        raise ConfigError(*reply["error"])
    if not reply.get("ok"):
        raise ConfigError("distribution.coordinator", f"process 0 stopped at start-up: {reply.get('failed', reply)}")
    return conn, payload


def turn_away(listener: socket.socket, expected: int, message: dict, window_s: float) -> None:
    """Process 0 failed before the meeting: each of the `expected` processes that comes within
    `window_s` hears `message` (its hello read first, so the reply is not lost to a reset)."""
    deadline = time.monotonic() + window_s
    try:
        for _ in range(expected):
            listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                return
            with conn:
                try:
                    conn.settimeout(5.0)
                    receive(conn)
                    send(conn, message)
                except (socket.timeout, OSError, ValueError):
                    pass
    finally:
        listener.close()
