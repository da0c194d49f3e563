"""Scratch network namespaces and socket holders for kernel tests (root only).

For what the lab does not build: TPROXY rules, sockets in odd states on chosen
ports.  Every name carries a unique ``hct-<hex>-`` prefix (other engineers run
kernel tests concurrently) and everything is removed on exit, failure included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest


def skip_unless_root(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


def unique_name(tag: str) -> str:
    return f"hct-{secrets.token_hex(2)}-{tag}"


def run(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def kill_netns_pids(name: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


@contextlib.contextmanager
def scratch_netns(tag: str) -> Iterator[str]:
    """A fresh netns with lo up; its processes are killed and it is deleted on exit."""
    name = unique_name(tag)
    run("ip", "netns", "add", name)
    try:
        run("ip", "link", "set", "lo", "up", netns=name)
        yield name
    finally:
        kill_netns_pids(name)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


class Holder:
    """A Python process in a netns running ``script``; prints READY when set up.

    The script's sockets live as long as the process; ``close()`` kills it.
    """

    def __init__(self, netns: str, script: str, timeout: float = 10.0) -> None:
        code = textwrap.dedent(script) + "\nimport sys, time\nprint('READY', flush=True)\n"
        code += "sys.stdin.read()\n"  # hold until our end of the pipe closes
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                self.close()
                raise RuntimeError(f"holder failed: {err.strip()}")
            if line.strip() == "READY":
                return
            self.lines.append(line.strip())
        self.close()
        raise TimeoutError("holder did not get ready")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@contextlib.contextmanager
def holder(netns: str, script: str) -> Iterator[Holder]:
    h = Holder(netns, script)
    try:
        yield h
    finally:
        h.close()


def ss(netns: str, *filters: str) -> list[str]:
    """``ss -Htan`` lines in ``netns`` (an independent oracle)."""
    return run("ss", "-Htan", *filters, netns=netns).stdout.splitlines()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")

