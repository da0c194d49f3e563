"""The batched kill path on a real kernel (agent/engine/kill.py, issue 11 §2).

Hundreds of leaks are re-checked and destroyed with many requests per send();
the per-socket safety must be exactly the one-at-a-time path's: inside the
same batch, a socket whose NAT entry came back, one that went meanwhile and one
whose cookie no longer matches are each left alone, the rest are destroyed,
the listener survives, and the proxy's upstream legs are verified afterwards
by one dump, without a sleep in the kill.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from halfclose.agent.core.model import Kind, Outcome
from halfclose.agent.core.plan import ActionKind, ActionSettings, SkipReason, make_plan
from halfclose.agent.engine.kill import kill, verify_upstreams
from halfclose.agent.engine.scan import Scanner, ScanSettings
from halfclose.agent.kernel.netns import NetnsHandle
from support.leakfarm import leaked_pairs
from support.scratchnet import run, skip_unless_root, ss

pytestmark = pytest.mark.kernel

LEAKS = 300


def test_batched_kill_keeps_every_per_socket_guard() -> None:
    skip_unless_root("iptables", "conntrack", "ss", "nsenter")
    with (
        leaked_pairs(LEAKS, prefix="hct") as lk,
        NetnsHandle.from_name(lk.netns) as handle,
        Scanner(handle) as scanner,
    ):
        result = scanner.scan(ScanSettings(capture_ports=frozenset({15001})))
        assert sum(f.kind is Kind.LEAKED for f in result.findings) == LEAKS
        settings = ActionSettings(action=ActionKind.KILL, min_idle_seconds=0, max_kills=LEAKS)
        decisions = list(make_plan(result.findings, result.capture_ports, settings).kills)
        assert len(decisions) == LEAKS

        # 1. The NAT entry is back (a live connection's packet was picked up again).
        revived = decisions[10].finding.socket
        app, local = revived.peer, revived.local
        run(
            "conntrack", "-I", "-p", "tcp",
            "-s", str(app.ip), "-d", "203.0.113.10", "--sport", str(app.port), "--dport", "7777",
            "-r", str(local.ip), "-q", str(app.ip),
            "--reply-port-src", str(local.port), "--reply-port-dst", str(app.port),
            "--state", "ESTABLISHED", "--timeout", "60",
            netns=lk.netns,
        )  # fmt: skip
        # 2. Gone meanwhile (someone else destroyed it).
        gone = decisions[20].finding.socket
        run(
            "ss", "-K", "state", "fin-wait-2",
            f"( sport = :{gone.local.port} and dport = :{gone.peer.port} )",
            netns=lk.netns,
        )  # fmt: skip
        # 3. The plan's cookie names another live leak, not the socket at that
        #    tuple (a stale or corrupted record): neither match alone may do.
        stale = decisions[30]
        other = decisions[40].finding.socket.cookie
        wrong = dataclasses.replace(stale.finding.socket, cookie=other)
        decisions[30] = dataclasses.replace(
            stale, finding=dataclasses.replace(stale.finding, socket=wrong)
        )

        started = time.monotonic()
        results = kill(scanner.sockdiag, scanner.conntrack, decisions, result.capture_ports)
        took = time.monotonic() - started

        assert results[10].outcome is Outcome.SKIPPED
        assert results[10].reason is SkipReason.ENTRY_REAPPEARED
        assert results[20].outcome is Outcome.SKIPPED
        assert results[20].reason is SkipReason.ALREADY_GONE
        assert (results[30].outcome, results[30].reason, results[30].error) == (
            Outcome.SKIPPED,
            SkipReason.ALREADY_GONE,
            None,
        ), results[30]
        assert results[40].outcome is Outcome.KILLED  # its own decision, its own tuple
        others = [r for i, r in enumerate(results) if i not in (10, 20, 30)]
        assert all(r.outcome is Outcome.KILLED for r in others), {
            (r.outcome, r.reason, r.error) for r in others
        }
        left = {ln.split()[-1] for ln in ss(lk.netns, "state", "fin-wait-2")}
        assert left == {str(revived.peer), str(stale.finding.socket.peer)}
        assert any(":15001 " in ln for ln in ss(lk.netns, "state", "listening"))
        assert took < 2.0, took  # no per-socket or per-netns sleep

        # The proxies close a leg when its downstream is destroyed: one dump shows it.
        legs = [
            d.finding.upstream
            for d, r in zip(decisions, results, strict=True)
            if r.outcome is Outcome.KILLED and d.finding.upstream is not None
        ]
        assert len(legs) == LEAKS - 3
        deadline = time.monotonic() + 5
        while True:
            status = verify_upstreams(
                scanner.sockdiag,
                paired_legs=legs,
                unpaired_kills=0,
                uids=frozenset({legs[0].uid}),
                baseline=None,
                capture_ports=result.capture_ports,
            )
            if len(status.closed) == len(legs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status.closed == {leg.cookie for leg in legs}
