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
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest


def lab_factory(request: pytest.FixtureRequest) -> Any:
    """The lab's ``make_lab`` fixture, or a skip while the lab is unavailable."""
    skip_unless_root("iptables", "nft", "conntrack")
    try:
        from halfclose.lab import Lab  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the lab (halfclose.lab) is not available: {exc}")
    try:
        return request.getfixturevalue("make_lab")
    except pytest.FixtureLookupError:
        pytest.skip("the lab fixtures (support.lab_fixtures) are not registered")


def skip_unless_root(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


# Resolved once: a test may narrow PATH (to hide tools) while a namespace is up,
# and teardown must still find `ip`.
IP = shutil.which("ip") or "/usr/sbin/ip"


def unique_name(tag: str) -> str:
    return f"hct-{secrets.token_hex(2)}-{tag}"


def run(
    *argv: str, netns: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [IP, "netns", "exec", netns, *argv] if netns else list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def kill_netns_pids(name: str) -> None:
    out = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True, check=False)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


@contextlib.contextmanager
def scratch_netns(tag: str) -> Iterator[str]:
    """A fresh netns with lo up; its processes are killed and it is deleted on exit."""
    name = unique_name(tag)
    run(IP, "netns", "add", name)
    try:
        run(IP, "link", "set", "lo", "up", netns=name)
        yield name
    finally:
        kill_netns_pids(name)
        subprocess.run([IP, "netns", "del", name], check=False, capture_output=True)


class Holder:
    """A Python process in a netns running ``script``, which prints READY when set up.

    With ``hold`` the process then waits for stdin to close; otherwise the
    script goes on to serve its own line protocol on stdin (``send``/``expect``).
    Its sockets live as long as the process; ``close()`` kills it.
    """

    def __init__(
        self, netns: str, script: str, *, hold: bool = True, timeout: float = 10.0
    ) -> None:
        code = textwrap.dedent(script)
        if hold:
            code += "\nimport sys\nprint('READY', flush=True)\nsys.stdin.read()\n"
        self.proc = subprocess.Popen(
            [IP, "netns", "exec", netns, sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        try:
            self.expect("READY", timeout)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, token: str, timeout: float = 10.0) -> list[str]:
        """Lines printed before ``token`` (bounded by ``timeout``)."""
        assert self.proc.stdout is not None
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"holder exited: {err.strip()[-2000:]}")
            if line.strip() == token:
                self.lines.extend(out)
                return out
            out.append(line.strip())
        raise TimeoutError(f"holder did not print {token}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@contextlib.contextmanager
def holder(netns: str, script: str, *, hold: bool = True) -> Iterator[Holder]:
    h = Holder(netns, script, hold=hold)
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


def redirect_pod(
    netns: str,
    app_ip: str,
    service: tuple[str, int],
    proxy_port: int,
    timeouts: Mapping[str, int],
) -> None:
    """A sidecar pod in miniature: the app's address and the service's on lo, the
    service REDIRECTed to ``proxy_port`` (as istio-iptables does), and the netns's
    conntrack TCP timeouts (``{"close_wait": 1, ...}``) set."""
    run("ip", "addr", "add", f"{app_ip}/24", "dev", "lo", netns=netns)
    run("ip", "addr", "add", f"{service[0]}/32", "dev", "lo", netns=netns)
    run(
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", service[0],
        "--dport", str(service[1]), "-j", "REDIRECT", "--to-ports", str(proxy_port),
        netns=netns,
    )  # fmt: skip
    for name, seconds in timeouts.items():
        run(
            "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_timeout_{name}={seconds}",
            netns=netns,
        )  # fmt: skip


@contextlib.contextmanager
def proxied_pairs(
    handle: Any, n: int, app_ip: str, service: tuple[str, int], proxy_port: int
) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """``n`` connections of the app's to ``service``, REDIRECTed to a listener on
    ``proxy_port`` inside ``handle``'s netns (see ``redirect_pod``), each past one
    exchange of data: (app, proxy) sockets, closed at exit."""
    held: list[socket.socket] = []
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        with handle.entered():
            listener = socket.socket()
            held.append(listener)
            listener.bind(("0.0.0.0", proxy_port))
            listener.listen(16)
            for _ in range(n):
                app = socket.socket()
                held.append(app)
                app.bind((app_ip, 0))
                app.connect(service)
                down, _ = listener.accept()
                held.append(down)
                pairs.append((app, down))
        for app, down in pairs:
            app.sendall(b"hello")
            assert down.recv(16) == b"hello"
        yield pairs
    finally:
        for s in held:
            s.close()
