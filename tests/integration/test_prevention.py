"""Prevention on the real kernel: extend-conntrack and patch-conntrack (docs/remediation.md).

The lab's ``late_close`` half-closes connections now and has the app close them
only after the pod's CLOSE_WAIT timeout: left alone they leak (each test keeps a
control batch, or relies on the lab's own leak test, to show that).  Acting in
between must keep the app's late FIN flowing to the proxy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from halfclose.agent.core.model import ConntrackEntry, FlowTuple, Kind, Outcome
from halfclose.agent.core.plan import ActionKind, ActionSettings, make_plan
from halfclose.agent.engine.act import Executor
from halfclose.agent.engine.ctpatch import CLOSE_WAIT_SYSCTL
from halfclose.agent.engine.scan import Scanner, ScanSettings
from halfclose.agent.kernel import sysctl
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.cli.main import main
from halfclose.lab import Lab, LateClose, ProxiedPair
from support.scratchnet import lab_factory

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a netns lab"),
]

CLOSE_WAIT = 2  # the pod's CLOSE_WAIT timeout
LATE = 4.5  # the app closes this long after the half-close: after the entry would expire


@pytest.fixture
def new_lab(request: pytest.FixtureRequest) -> Callable[..., Lab]:
    return lab_factory(request)  # type: ignore[no-any-return]


def reply_of(p: ProxiedPair) -> FlowTuple:
    """The NAT entry's reply tuple: proxy downstream -> app (design.md §2)."""
    return FlowTuple(p.proxy_downstream.ip, p.proxy_downstream.port, p.app.ip, p.app.port)


def entries(handle: NetnsHandle, pairs: tuple[ProxiedPair, ...]) -> list[ConntrackEntry | None]:
    ct = Conntrack.open(handle)
    try:
        return [ct.get_by_reply(reply_of(p)) for p in pairs]
    finally:
        ct.close()


def proxy_states(handle: NetnsHandle, pairs: tuple[ProxiedPair, ...]) -> list[tuple[str, str]]:
    """(downstream, upstream) states of the proxy's sockets per pair; "-" when gone."""
    from halfclose.agent.core.model import TcpState
    from halfclose.agent.kernel.sockdiag import SockDiag

    diag = SockDiag.open(handle)
    try:
        _, socks = diag.dump(list(TcpState))
    finally:
        diag.close()
    by_tuple = {(str(s.local), str(s.peer)): s.state.ss_name for s in socks}
    out = []
    for p in pairs:
        down = by_tuple.get((str(p.proxy_downstream), str(p.app)), "-")
        up = next((st for (loc, _), st in by_tuple.items() if loc == str(p.proxy_upstream)), "-")
        out.append((down, up))
    return out


def settle(lab: Lab, *batches: LateClose) -> None:
    for b in batches:
        lab.wait_late_closed(b)
    time.sleep(0.5)  # the app's FIN and the proxy's reaction, on veths: well under this


def test_extend_conntrack_prevents_the_leak_and_touches_no_other_entry(
    new_lab: Callable[..., Lab],
) -> None:
    lab = new_lab(close_wait_timeout=CLOSE_WAIT)
    idle = lab.idle(1)
    saved = lab.late_close(2, after_seconds=LATE)
    control = lab.late_close(1, after_seconds=LATE)  # not extended: must leak
    with NetnsHandle.from_name(lab.pod_netns(0)) as h, Scanner(h) as scanner:
        idle_before = entries(h, tuple(idle))
        result = scanner.scan(ScanSettings(min_idle_seconds=0))
        targets = {str(p.app) for p in saved.pairs}
        mine = [f for f in result.findings if str(f.socket.peer) in targets]
        assert [f.kind for f in mine] == [Kind.AT_RISK, Kind.AT_RISK]
        plan = make_plan(mine, result.capture_ports, ActionSettings(ActionKind.EXTEND_CONNTRACK))
        outcomes = Executor(scanner.sockdiag, scanner.conntrack).remediate(plan).outcomes
        assert [o.outcome for o in outcomes] == [Outcome.EXTENDED, Outcome.EXTENDED]
        assert all(o.timeout_after is not None and o.timeout_after > 3500 for o in outcomes)

        # Exactly those entries: the control's and the idle connection's are as they were.
        assert [e.timeout if e else None for e in entries(h, saved.pairs)] >= [3500, 3500]
        (ctl,) = entries(h, control.pairs)
        assert ctl is not None and ctl.timeout <= CLOSE_WAIT
        (idle_after,) = entries(h, tuple(idle))
        assert idle_after is not None and idle_before[0] is not None
        assert idle_after.timeout <= idle_before[0].timeout

        settle(lab, saved, control)
        states = proxy_states(h, saved.pairs)
        assert all(down in ("-", "TIME-WAIT") and up in ("-", "LAST-ACK") for down, up in states)
        assert proxy_states(h, control.pairs) == [("FIN-WAIT-2", "CLOSE-WAIT")]

        # The extension ended with the connection: normal close timeouts, not 3600 s.
        time_wait = sysctl.read_int(h, "net.netfilter.nf_conntrack_tcp_timeout_time_wait")
        for e in entries(h, saved.pairs):
            assert e is None or (e.tcp_state in ("TIME_WAIT", "CLOSE") and e.timeout <= time_wait)

        after = scanner.scan(ScanSettings(min_idle_seconds=0))
        assert [str(f.socket.peer) for f in after.findings if f.kind is Kind.LEAKED] == [
            str(control.pairs[0].app)
        ]


def scan_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main([*argv, "--output", "json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_patch_conntrack_prevents_the_leak_and_restore_puts_it_back(
    new_lab: Callable[..., Lab], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = new_lab(close_wait_timeout=CLOSE_WAIT)
    pod = lab.pod_netns(0)
    patch = ["scan", "--netns", pod, "--action", "patch-conntrack", "--state-dir", str(tmp_path)]
    first = scan_json([*patch, "--close-wait-timeout", "30"], capsys)["conntrack_patch"]
    assert (first["before"], first["after"], first["changed"]) == (CLOSE_WAIT, 30, True)
    again = scan_json([*patch, "--close-wait-timeout", "30"], capsys)["conntrack_patch"]
    assert (again["before"], again["after"], again["changed"]) == (30, 30, False)

    late = lab.late_close(2, after_seconds=LATE)
    with NetnsHandle.from_name(pod) as h:
        settle(lab, late)
        states = proxy_states(h, late.pairs)
        assert all(down in ("-", "TIME-WAIT") and up in ("-", "LAST-ACK") for down, up in states)
        doc = scan_json(["scan", "--netns", pod], capsys)
        assert doc["findings"] == []

        assert main(["conntrack", "restore", "--netns", pod, "--state-dir", str(tmp_path)]) == 0
        assert sysctl.read_int(h, CLOSE_WAIT_SYSCTL) == CLOSE_WAIT
        capsys.readouterr()
        assert main(["conntrack", "status", "--netns", pod, "--state-dir", str(tmp_path)]) == 0
        assert "not patched" in capsys.readouterr().out
