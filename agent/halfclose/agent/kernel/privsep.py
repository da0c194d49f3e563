"""Privilege separation: a forked worker keeps the capabilities, the rest drops them.

The agent's network-facing code (the Kubernetes client, the metrics/health
server) needs no capability at all; the kernel work (entering network
namespaces, sock_diag, ctnetlink, sysctls) needs NET_ADMIN and SYS_ADMIN.  So
``start_worker`` forks before any socket to the network exists: the child
keeps the capabilities, owns no listener and no API credentials, and answers
requests on its end of a socketpair; the parent calls ``drop_capabilities``
and goes on to talk to the network.  A compromised parser in the network-facing
process then holds uid 0 without capabilities, under no_new_privs (an exec of
anything cannot bring them back).

The wire is deliberately dumb: a 4-byte length and a JSON document per
message (never pickle: the worker must not execute what the unprivileged side
sends), plus file descriptors through SCM_RIGHTS where a method hands one out
(a conntrack event socket the parent polls).  The worker only runs the
methods registered in its handler table; anything else is an error reply.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

MAX_MESSAGE = 256 << 20  # measured ~0.7 KB of JSON per finding: 90k leaked pairs (ztunnel) ~65 MB
MAX_FDS = 16
_LEN = struct.Struct("!I")

Handler = Callable[[Mapping[str, Any], list[int]], tuple[Any, Sequence[int]]]


class WorkerError(RuntimeError):
    """The worker is gone or answered something that is not a reply."""


# -- capabilities ---------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _prctl(option: int, arg2: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def drop_capabilities() -> None:
    """Effective, permitted, inheritable and ambient sets to nothing; no_new_privs on.

    The bounding set stays (lowering it needs CAP_SETPCAP, which the chart
    does not grant); with no_new_privs and an empty permitted set an exec
    cannot raise anything back, not even as uid 0.
    """
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def capabilities_of(pid: int | str = "self", proc_root: str = "/proc") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a process, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"{proc_root}/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                out[key] = int(value.strip(), 16)
    return out


# -- the wire ---------------------------------------------------------------------------


def send_message(sock: socket.socket, obj: Any, fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is over the {MAX_MESSAGE} limit")
    frame = _LEN.pack(len(data)) + data
    if fds:
        # The descriptors ride on the first byte; the rest follows as plain data.
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([frame], ancillary)
        frame = frame[sent:]
    if frame:
        sock.sendall(frame)


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    chunks: list[bytes] = []
    got = 0
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    while got < size:
        data, ancillary, _flags, _addr = sock.recvmsg(min(size - got, 1 << 20), space)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError("peer closed the socket")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> tuple[Any, list[int]]:
    fds: list[int] = []
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size, fds))
    if size > MAX_MESSAGE:
        for fd in fds:
            os.close(fd)
        raise WorkerError(f"message of {size} bytes is over the {MAX_MESSAGE} limit")
    body = _recv_exact(sock, size, fds)
    return json.loads(body), fds


# -- the worker ---------------------------------------------------------------------------


def _error_reply(exc: BaseException) -> dict[str, Any]:
    """An exception as data: an OSError keeps its errno (callers tell EPERM from ENOENT)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        message = exc.strerror or str(exc)
        if exc.filename is not None:
            message = f"{message}: {exc.filename}"
        return {"error": {"type": type(exc).__name__, "errno": exc.errno, "message": message}}
    return {"error": {"type": type(exc).__name__, "errno": None, "message": str(exc)}}


def serve(sock: socket.socket, handlers: Mapping[str, Handler]) -> None:
    """Answer requests until the parent closes its end (or dies)."""
    while True:
        try:
            request, fds = recv_message(sock)
        except (EOFError, ConnectionError):
            return
        method = request.get("method") if isinstance(request, dict) else None
        params = request.get("params") if isinstance(request, dict) else None
        handler = handlers.get(method) if isinstance(method, str) else None
        out_fds: Sequence[int] = ()
        if handler is None or not isinstance(params, dict):
            for fd in fds:
                os.close(fd)
            reply: dict[str, Any] = {
                "error": {
                    "type": "WorkerError",
                    "errno": None,
                    "message": f"no such method: {method!r}",
                }
            }
        else:
            try:
                result, out_fds = handler(params, fds)
                reply = {"result": result}
            except Exception as exc:
                reply = _error_reply(exc)
        try:
            send_message(sock, reply, out_fds)
        except (BrokenPipeError, ConnectionError):
            return
        finally:
            for fd in out_fds:  # handed over (dup'd by the kernel) or lost with the parent
                os.close(fd)


@dataclass
class WorkerClient:
    """The parent's end: ``call`` one method at a time (a lock keeps replies in order).

    An error reply becomes an exception again: a type named in ``errors`` (an
    allowlist: name -> class taking one message) as that class, one with an
    errno as ``OSError`` (so ``PermissionError``, ``FileNotFoundError``, ...),
    anything else as ``WorkerError``.
    """

    sock: socket.socket
    pid: int
    errors: Mapping[str, Callable[[str], BaseException]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> tuple[Any, list[int]]:
        with self._lock:
            try:
                send_message(self.sock, {"method": method, "params": dict(params or {})}, fds)
                reply, got = recv_message(self.sock)
            except (EOFError, OSError) as exc:
                raise WorkerError(f"the kernel worker (pid {self.pid}) is gone: {exc}") from None
        if not isinstance(reply, dict):
            raise WorkerError(f"not a reply: {reply!r}")
        if "error" in reply:
            for fd in got:
                os.close(fd)
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            kind, message = str(error.get("type")), str(error.get("message"))
            if kind in self.errors:
                raise self.errors[kind](message)
            if isinstance(error.get("errno"), int):
                raise OSError(int(error["errno"]), message)
            raise WorkerError(f"{kind}: {message}")
        return reply.get("result"), got

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        deadline_polls = int(timeout / 0.05)
        for _ in range(max(deadline_polls, 1)):
            pid, _status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return
            threading.Event().wait(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def start_worker(
    handlers: Callable[[], Mapping[str, Handler]],
    errors: Mapping[str, Callable[[str], BaseException]] | None = None,
) -> WorkerClient:
    """Fork the privileged worker; returns the parent's client. Call before any thread starts.

    ``handlers`` is called in the child: whatever it opens (the kernel side's
    state) exists only there.
    """
    parent = os.getpid()
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            parent_end.close()
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            # The parent died before PDEATHSIG was armed (reparented). Not "== 1":
            # without hostPID the agent itself is PID 1 of its container.
            if os.getppid() != parent:
                os._exit(0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
            serve(child_end, handlers())
        except BaseException:
            log.exception("kernel worker failed")
            code = 1
        finally:
            os._exit(code)
    child_end.close()
    return WorkerClient(parent_end, pid, dict(errors or {}))
