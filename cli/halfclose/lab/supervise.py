"""Starting, identifying and stopping lab processes (the launcher's side)."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence

from halfclose.lab import netns
from halfclose.lab.errors import LabError


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(b")") + 2 :].split()
    return int(rest[19])  # field 22 overall


def alive(pid: int, started: int | None) -> bool:
    """True if ``pid`` is still the process that started at ``started`` (and not a zombie)."""
    now = start_time(pid)
    if now is None or (started is not None and now != started):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


def launch(netns_name: str, argv: Sequence[str], log_path: str) -> subprocess.Popen[bytes]:
    """Start a daemon inside a netns, detached from our session, logging to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            netns.enter_argv(netns_name, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            # Its own session: a `halfclose lab up` that exits, or a ^C in
            # the terminal, must not take the lab's processes with it.
            start_new_session=True,
            close_fds=True,
        )


def wait_ready(procs: Sequence[tuple[str, subprocess.Popen[bytes], str]], timeout: float) -> None:
    """Wait until each daemon printed ``ready``; on failure say which and why (its log)."""
    pending = {p.stdout.fileno(): (what, p, log) for what, p, log in procs if p.stdout}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in pending:
            sel.register(fd, selectors.EVENT_READ)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                what, _, log = next(iter(pending.values()))
                raise LabError(f"{what} not ready after {timeout:.0f}s (log: {log})")
            for key, _ in sel.select(left):
                fd = int(key.fd)
                what, proc, log = pending.pop(fd)
                sel.unregister(fd)
                line = os.read(fd, 64)
                assert proc.stdout is not None
                proc.stdout.close()
                if not line.startswith(b"ready"):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(1)
                    raise LabError(f"{what} failed to start: {_last_line(log)} (log: {log})")


def _last_line(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def terminate(pids: Iterable[int], *, grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds.  Returns the pids signalled."""
    signalled = []
    for pid in set(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
    left = _wait_gone(signalled, grace)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(left, 2.0)
    return sorted(signalled)


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [pid for pid in left if alive(pid, None)]
        if left:
            time.sleep(0.02)
    return left
