"""The agent's fast path on the real kernel: the proof, not the prediction, decides.

The agent re-checks just the sockets whose leak it predicted (an at-risk
socket seen by a scan, or a reply tuple a conntrack UPDATE into CLOSE_WAIT
named: ``engine/recheck.py``), without a scan of the netns.  Between the
prediction and the re-check anything may happen.  Here, after three
connections were predicted to leak and their entries expired:

- A: the app sent data (its packet was picked up mid-stream and reached the
  proxy), then the new entry was deleted: no entry, but not silent -- the
  entry did not expire, the connection is alive (entry-removed-early);
- B: an entry under its NAT reply tuple is back (a live mapping): at-risk;
- C: nothing happened: leaked, and the only one destroyed.

Both kinds of prediction are checked: the scan's records (cookie and tuple)
and an event's tuple-only probe.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from halfclose.agent.core.model import Kind, Outcome, SocketRecord, UnprovenReason
from halfclose.agent.core.plan import ActionKind, ActionSettings, make_plan
from halfclose.agent.daemon.rechecks import probe_for
from halfclose.agent.engine.act import Executor
from halfclose.agent.engine.recheck import recheck
from halfclose.agent.engine.scan import Scanner, ScanSettings
from halfclose.agent.kernel.netns import NetnsHandle
from support.scratchnet import (
    proxied_pairs,
    redirect_pod,
    run,
    scratch_netns,
    skip_unless_root,
    ss,
)

pytestmark = pytest.mark.kernel

APP_IP = "192.0.2.10"
SERVICE = ("203.0.113.10", 7777)
PROXY_PORT = 15001
CLOSE_WAIT = 1  # the netns's half-closed timeout: part 4's bar is 1.2 s of silence
SETTINGS = ScanSettings(capture_ports=frozenset({PROXY_PORT}), rules_max_age_seconds=60.0)


def _pod(ns: str) -> None:
    redirect_pod(
        ns, APP_IP, SERVICE, PROXY_PORT, {"close_wait": CLOSE_WAIT, "fin_wait": CLOSE_WAIT}
    )


@contextlib.contextmanager
def half_closed(handle: NetnsHandle, n: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """``n`` proxied connections whose proxy forwarded the upstream's FIN
    (``shutdown(SHUT_WR)``) while the app stays open: (app, proxy) sockets."""
    with proxied_pairs(handle, n, APP_IP, SERVICE, PROXY_PORT) as pairs:
        for app, down in pairs:
            down.shutdown(socket.SHUT_WR)
            assert app.recv(16) == b""  # the FIN arrived: the entry is in CLOSE_WAIT
        yield pairs


def _entries(ns: str, app_port: int) -> str:
    out = run(
        "conntrack", "-L", "-p", "tcp", "--orig-port-src", str(app_port), netns=ns, check=False
    )
    return out.stdout


@pytest.mark.parametrize("predicted_by", ["scan", "event"])
def test_fast_path_kills_only_what_the_fresh_proof_shows(predicted_by: str) -> None:
    skip_unless_root("iptables", "conntrack", "ss", "sysctl")
    with (
        scratch_netns("fast") as ns,
        NetnsHandle.from_name(ns) as handle,
    ):
        _pod(ns)
        with half_closed(handle, 3) as pairs, Scanner(handle) as scanner:
            # The prediction: a scan sees three at-risk sockets (entries alive).
            before = scanner.scan(SETTINGS)
            assert sorted(f.kind for f in before.findings) == [Kind.AT_RISK] * 3
            by_port = {f.socket.peer.port: f.socket for f in before.findings}
            ports = [app.getsockname()[1] for app, _ in pairs]
            a, b, c = (by_port[p] for p in ports)
            predicted: list[SocketRecord] = [a, b, c]
            if predicted_by == "event":
                predicted = [probe_for(s.nat_reply_tuple) for s in predicted]

            # Their entries expire and part 4's bar passes (bar 1.2 s of silence).
            time.sleep(CLOSE_WAIT + 0.2 + 0.5)
            assert not any(_entries(ns, p).strip() for p in ports)

            # A: the app is alive: its data reaches the proxy (a new entry picked
            # up mid-stream, NATed again), then that entry is deleted.
            pairs[0][0].sendall(b"still here")
            assert pairs[0][1].recv(16) == b"still here"
            run("conntrack", "-D", "-p", "tcp", "--orig-port-src", str(ports[0]), netns=ns)
            assert not _entries(ns, ports[0]).strip()
            # B: an entry under its NAT reply tuple is back (a live mapping).
            run(
                "conntrack", "-I", "-p", "tcp",
                "-s", APP_IP, "-d", SERVICE[0],
                "--sport", str(ports[1]), "--dport", str(SERVICE[1]),
                "-r", "127.0.0.1", "-q", APP_IP,
                "--reply-port-src", str(PROXY_PORT), "--reply-port-dst", str(ports[1]),
                "--state", "ESTABLISHED", "--timeout", "60",
                netns=ns,
            )  # fmt: skip

            result = recheck(scanner, tuple(predicted), SETTINGS)
            assert result is not None
            judged = {f.socket.peer.port: f for f in result.findings}
            assert set(judged) == set(ports)
            fa, fb, fc = (judged[p] for p in ports)
            assert (fa.kind, fa.reason) == (Kind.UNPROVEN, UnprovenReason.ENTRY_REMOVED_EARLY)
            assert fb.kind is Kind.AT_RISK
            assert fc.kind is Kind.LEAKED
            assert {f.socket.cookie for f in result.findings} == {a.cookie, b.cookie, c.cookie}

            settings = ActionSettings(action=ActionKind.KILL, min_idle_seconds=0)
            plan = make_plan(result.findings, result.capture_ports, settings)
            report = Executor(scanner.sockdiag, scanner.conntrack).execute(
                plan, watch_unpaired=False
            )
            killed = {
                o.finding.socket.peer.port for o in report.outcomes if o.outcome is Outcome.KILLED
            }
            assert killed == {ports[2]}
            left = {ln.split()[-1] for ln in ss(ns, "state", "fin-wait-2")}
            assert left == {f"{APP_IP}:{ports[0]}", f"{APP_IP}:{ports[1]}"}
