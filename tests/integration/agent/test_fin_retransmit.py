"""A retransmitted FIN moves the NAT entry on; the leak still forms, later, and is dated.

The proxy forwards the upstream's FIN; the app's kernel ACKs it and conntrack
sees the ACK (the entry goes CLOSE_WAIT), but the ACK is lost after that (on a
node: a loopback backlog drop in a burst of closes).  TCP sends the FIN again,
and conntrack cannot tell a second FIN of one side from the other side's: the
entry goes LAST_ACK, the app's ACK of it TIME_WAIT (120 s by default), though
the app never closed.  The proxy's socket is in FIN_WAIT2 once an ACK gets
through.  When the TIME_WAIT timer runs out, the app's late FIN is INVALID:
the same leak, formed by another timer.

The agent dates an at-risk socket's leak by its entry's timer
(``daemon/schedule.py``); it must date this one too (else only the interval's
scan finds it).  Here the drop is an iptables rule that runs after conntrack.
"""

from __future__ import annotations

import socket
import time

import pytest

from halfclose.agent.core.model import Kind
from halfclose.agent.daemon import schedule
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
    wait_for,
)

pytestmark = pytest.mark.kernel

APP_IP = "192.0.2.10"
SERVICE = ("203.0.113.10", 7777)
PROXY_PORT = 15001
HALF_CLOSED = 2  # close_wait and fin_wait: part 4's bar is 2.2 s of silence
TIME_WAIT = 4  # the timer the retransmitted FIN puts the entry under
SETTINGS = ScanSettings(capture_ports=frozenset({PROXY_PORT}), rules_max_age_seconds=60.0)


def _pod(ns: str) -> None:
    half_closed = {"close_wait": HALF_CLOSED, "fin_wait": HALF_CLOSED}
    redirect_pod(ns, APP_IP, SERVICE, PROXY_PORT, {**half_closed, "last_ack": TIME_WAIT,
                                                   "time_wait": TIME_WAIT})  # fmt: skip


def _entry_state(ns: str, app_port: int) -> str | None:
    out = run(
        "conntrack", "-L", "-p", "tcp", "--orig-port-src", str(app_port), netns=ns, check=False
    ).stdout.split()
    return out[3] if len(out) > 3 else None


def test_an_entry_moved_on_by_a_retransmitted_fin_dates_the_leak() -> None:
    skip_unless_root("iptables", "conntrack", "ss", "sysctl")
    with (
        scratch_netns("finrx") as ns,
        NetnsHandle.from_name(ns) as handle,
    ):
        _pod(ns)
        with proxied_pairs(handle, 1, APP_IP, SERVICE, PROXY_PORT) as [(app, down)]:
            app_port = app.getsockname()[1]
            # Every packet of the app's to the proxy is dropped after conntrack.
            drop = ["OUTPUT", "-p", "tcp", "-s", APP_IP, "--sport", str(app_port),
                    "--dport", str(PROXY_PORT), "-j", "DROP"]  # fmt: skip
            run("iptables", "-A", *drop, netns=ns)
            down.shutdown(socket.SHUT_WR)
            assert app.recv(16) == b""  # the FIN reached the app, which ACKed it
            # The proxy's FIN comes again (its ACK never arrived): the entry moves on.
            wait_for(lambda: _entry_state(ns, app_port) in {"LAST_ACK", "TIME_WAIT"}, 10.0)
            run("iptables", "-D", *drop, netns=ns)
            # The next retransmission's ACK gets through: FIN_WAIT2, the app still open.
            wait_for(lambda: bool(ss(ns, "state", "fin-wait-2")), 10.0)
            state = _entry_state(ns, app_port)
            assert state in {"LAST_ACK", "TIME_WAIT"}, state

            with Scanner(handle) as scanner:
                (finding,) = scanner.scan(SETTINGS).findings
                assert finding.kind is Kind.AT_RISK
                assert finding.entry is not None
                assert finding.entry.tcp_state == state
                # The leak is dated by this entry's own timer, not left to the interval.
                timing = schedule.Timing(interval=300.0, min_idle=0.0, kills=True)
                delay = schedule.finding_delay(finding, timing)
                assert delay is not None, "an entry a second FIN moved on must date the leak"
                assert delay <= finding.entry.timeout + 1.1
                time.sleep(delay)
                # Then the re-check the agent runs at that moment proves the leak.
                result = recheck(scanner, (finding.socket,), SETTINGS)
                assert result is not None
                (after,) = result.findings
                assert after.kind is Kind.LEAKED, (after.kind, after.reason, after.entry)
