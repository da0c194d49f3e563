"""``halfclose demo``: the leak, reproduced in the lab, found, fixed and prevented.

A story in five steps that a person can follow and CI can check: every step
verifies on the kernel what it is about to claim, and a claim that does not
hold ends the demo with ``DemoFailed`` (exit 1).  The lab is torn down in a
``finally``, on success, failure and Ctrl-C alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from halfclose.agent.core.model import Kind, TcpState
from halfclose.agent.engine.ctpatch import CLOSE_WAIT_SYSCTL, CloseWaitPatcher
from halfclose.agent.engine.scan import Scanner, ScanResult, ScanSettings
from halfclose.agent.kernel import sysctl
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.demo.console import Console
from halfclose.demo.view import Row, Viewer, render
from halfclose.lab import Lab, LabSettings, LateClose, ProxiedPair

STEPS = 6


class DemoFailed(Exception):
    """A step did not show what it claims (the demo is also an end-to-end check)."""


@dataclass(frozen=True, slots=True)
class DemoSettings:
    prefix: str = "hc-demo"
    connections: int = 3
    # Short, so the leak forms in seconds; the kernel's default is 60 s.
    close_wait_timeout: int = 4
    # How long after the half-close the app closes: after the entry expired.
    app_close_after: float = 6.0
    # The timeout patch-conntrack shows (then restores).
    patch_timeout: int = 600


def check(condition: bool, claim: str) -> None:
    if not condition:
        raise DemoFailed(claim)


class Demo:
    def __init__(
        self,
        settings: DemoSettings,
        console: Console,
        run_cli: Callable[[list[str]], int],
    ) -> None:
        self.s = settings
        self.c = console
        self.run_cli = run_cli  # halfclose.cli.main.main: the demo runs the real commands

    # -- helpers ----------------------------------------------------------------

    def cli(self, argv: list[str]) -> None:
        self.c.command(["halfclose", *argv])
        rc = self.run_cli(argv)
        check(rc == 0, f"`halfclose {' '.join(argv)}` exited {rc}")

    def scan(self, scanner: Scanner) -> ScanResult:
        return scanner.scan(ScanSettings(min_idle_seconds=0.0))

    def show(self, viewer: Viewer, tracked: tuple[ProxiedPair, ...]) -> list[Row]:
        rows = viewer.observe(tracked)
        self.c.block(render(tracked, rows))
        return rows

    # -- the story ---------------------------------------------------------------

    def run(self) -> None:
        s, c = self.s, self.c
        lab = Lab(LabSettings(prefix=s.prefix, close_wait_timeout=s.close_wait_timeout))
        try:
            c.step(1, STEPS, "A pod with an Envoy-like sidecar, in network namespaces")
            lab.up()
            pod = lab.pod_netns(0)
            c.say(
                f"netns {pod}: app + sidecar proxy on :15001 (iptables REDIRECT, uid 1337 "
                "exempt),\nan upstream server in its own netns, "
                f"nf_conntrack_tcp_timeout_close_wait = {s.close_wait_timeout} s in the pod "
                "(the kernel default is 60 s)."
            )
            with NetnsHandle.from_name(pod) as handle, Scanner(handle) as scanner:
                viewer = Viewer(scanner.sockdiag, scanner.conntrack)
                self.leak_and_kill(lab, pod, scanner, viewer)
                self.prevent(lab, pod, scanner, viewer)
                self.patch(pod, handle)
        finally:
            c.step(STEPS, STEPS, "Tear the lab down")
            lab.down()
            c.ok("every namespace and process of the lab is gone")

    def _half_close(self, lab: Lab, scanner: Scanner) -> tuple[tuple[ProxiedPair, ...], LateClose]:
        s = self.s
        late = lab.late_close(s.connections, after_seconds=s.app_close_after)
        result = self.scan(scanner)
        apps = {str(p.app) for p in late.pairs}
        at_risk = [
            f for f in result.findings if f.kind is Kind.AT_RISK and str(f.socket.peer) in apps
        ]
        check(
            len(at_risk) == s.connections and len(result.findings) == s.connections,
            f"expected {s.connections} at-risk sockets, the scan found "
            f"{len(at_risk)} of them at-risk among {len(result.findings)}",
        )
        return late.pairs, late

    def leak_and_kill(self, lab: Lab, pod: str, scanner: Scanner, viewer: Viewer) -> None:
        s, c = self.s, self.c
        c.step(2, STEPS, "The leak forms")
        c.say(
            f"The upstream closes {s.connections} connections. The proxy forwards the FIN to the "
            "app\nwith shutdown(SHUT_WR): its socket to the app waits in FIN-WAIT-2, its upstream "
            "socket\nin CLOSE-WAIT, and the NAT entry that maps the app's packets to :15001 "
            "counts down:"
        )
        tracked, late = self._half_close(lab, scanner)
        self.show(viewer, tracked)
        c.say(
            f"The app closes only after {s.app_close_after:.0f} s, when the entry has expired "
            "(a slow client, a pooled connection)."
        )

        def app_closed_and_entries_gone() -> bool:
            # The app's FIN goes out at closes_at; give it a moment on the wire.
            waited = time.time() >= late.closes_at + 0.5
            return waited and all(r.entry is None for r in viewer.observe(tracked))

        def countdown() -> str:
            left = [r.entry.timeout for r in viewer.observe(tracked) if r.entry is not None]
            entries = f"NAT entries: {max(left)} s left" if left else "NAT entries: expired"
            app = max(0.0, late.closes_at - time.time())
            return f"{entries}; app closes in {app:.0f} s" if app else f"{entries}; app closed"

        c.wait(
            "waiting for conntrack to expire the NAT entries and the app to close",
            s.app_close_after + s.close_wait_timeout + 5,
            app_closed_and_entries_gone,
            status=countdown,
            expected=max(0.0, late.closes_at + 0.5 - time.time()),
        )
        rows = self.show(viewer, tracked)
        check(
            all(r.entry is None for r in rows)
            and all(r.downstream is TcpState.FIN_WAIT2 for r in rows)
            and all(r.upstream is TcpState.CLOSE_WAIT for r in rows),
            "the proxy sockets did not stay FIN-WAIT-2/CLOSE-WAIT with their entries gone",
        )
        c.say(
            "The app's FIN matched no entry: it was not NATed and never reached the proxy.\n"
            "Both proxy sockets are leaked; Envoy would hold them for an hour (its idle timeout)."
        )
        result = self.scan(scanner)
        leaked = [f for f in result.findings if f.kind is Kind.LEAKED]
        check(
            len(leaked) == s.connections,
            f"the scan found {len(leaked)} leaked, not {s.connections}",
        )
        c.ok(f"halfclose scan classifies all {len(leaked)} as leaked (FIN-WAIT-2, NAT entry gone)")

        c.step(3, STEPS, "Kill the leaked sockets")
        c.say(
            "SOCK_DESTROY, keyed by each socket's cookie (never without: a stale tuple would "
            "hit the\nlistener), after re-checking each socket right before acting. "
            "--min-idle 0 because the\nlab's leaks are seconds old (the default is 60 s)."
        )
        self.cli(["scan", "--netns", pod, "--action", "kill", "--min-idle", "0"])

        def upstreams_closed() -> bool:
            return all(r.upstream is not TcpState.CLOSE_WAIT for r in viewer.observe(tracked))

        # The proxy reacts to the kill within milliseconds; bound the wait anyway.
        deadline = time.monotonic() + 3.0
        while not upstreams_closed() and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = self.show(viewer, tracked)
        check(
            all(r.downstream is None for r in rows),
            "a killed proxy socket to the app is still there",
        )
        check(
            all(r.upstream in (None, TcpState.LAST_ACK, TcpState.CLOSE) for r in rows),
            "a paired upstream socket stayed in CLOSE-WAIT after the kill",
        )
        c.ok("both proxy sockets of every leaked pair are gone: the proxy closed its upstream side")

    def prevent(self, lab: Lab, pod: str, scanner: Scanner, viewer: Viewer) -> None:
        s, c = self.s, self.c
        c.step(4, STEPS, "Prevent it: extend-conntrack")
        c.say(
            f"Again {s.connections} half-closed connections whose app will close after "
            f"{s.app_close_after:.0f} s,\nbut this time halfclose extends exactly their NAT "
            "entries first (no other entry is touched):"
        )
        tracked, late = self._half_close(lab, scanner)
        self.cli(["scan", "--netns", pod, "--action", "extend-conntrack"])
        rows = self.show(viewer, tracked)
        check(
            all(r.entry is not None and r.entry.timeout > s.app_close_after + 10 for r in rows),
            "an at-risk entry was not extended",
        )

        def app_closed() -> bool:
            if time.time() < late.closes_at:
                return False
            return all(r.downstream is not TcpState.FIN_WAIT2 for r in viewer.observe(tracked))

        c.wait(
            "waiting for the app to close, after the original timeout",
            s.app_close_after + 5,
            app_closed,
            status=lambda: f"app closes in {max(0.0, late.closes_at - time.time()):.0f} s",
            expected=max(0.0, late.closes_at - time.time()),
        )
        rows = self.show(viewer, tracked)
        check(
            all(r.downstream in (None, TcpState.TIME_WAIT) for r in rows)
            and all(r.upstream in (None, TcpState.LAST_ACK, TcpState.CLOSE) for r in rows),
            "a proxy socket leaked although its entry had been extended",
        )
        check(
            all(
                r.entry is None or r.entry.tcp_state in ("TIME_WAIT", "CLOSE", "LAST_ACK")
                for r in rows
            ),
            "an extended entry did not follow the connection's close",
        )
        result = self.scan(scanner)
        check(not result.findings, f"the scan still finds {len(result.findings)} sockets")
        c.ok(
            "the app's late FIN reached the proxy: the connection closed normally, "
            "nothing leaked.\n"
            "   The entries now follow the kernel's normal TIME_WAIT timeout: the extension does "
            "not outlive the connection."
        )

    def patch(self, pod: str, handle: NetnsHandle) -> None:
        s, c = self.s, self.c
        c.step(5, STEPS, "Or, without an agent: patch-conntrack for this pod only")
        c.say(
            "Raises nf_conntrack_tcp_timeout_close_wait in this pod's netns only, recording the "
            "old value\nso it can be put back:"
        )
        before = sysctl.read_int(handle, CLOSE_WAIT_SYSCTL)
        root = sysctl.read_int(None, CLOSE_WAIT_SYSCTL)
        try:
            self.cli(
                [
                    "scan",
                    "--netns",
                    pod,
                    "--action",
                    "patch-conntrack",
                    "--close-wait-timeout",
                    str(s.patch_timeout),
                ]
            )
            check(
                sysctl.read_int(handle, CLOSE_WAIT_SYSCTL) == s.patch_timeout,
                "patch-conntrack did not set the pod's timeout",
            )
            check(sysctl.read_int(None, CLOSE_WAIT_SYSCTL) == root, "the host's timeout changed")
            self.cli(["conntrack", "status", "--netns", pod])
            self.cli(["conntrack", "restore", "--netns", pod])
            check(
                sysctl.read_int(handle, CLOSE_WAIT_SYSCTL) == before,
                "restore did not put the old timeout back",
            )
        finally:
            # Never leave a record behind for a netns about to be deleted.
            CloseWaitPatcher().forget(handle)
        c.ok(f"patched to {s.patch_timeout} s and restored to {before} s; the host kept {root} s")


def run_demo(settings: DemoSettings, console: Console, run_cli: Callable[[list[str]], int]) -> None:
    Demo(settings, console, run_cli).run()
