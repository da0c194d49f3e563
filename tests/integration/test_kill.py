"""``--action kill`` on the real kernel, with the leak lab (docs/remediation.md).

Each test builds its own lab (unique prefix, torn down by the fixture) with a
short close-wait timeout so leaks form in seconds.  The kernel's own view —
``ss -tan`` and ``conntrack -L`` of the pod netns — is the oracle, not our
scanner.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from halfclose.agent.core.model import (
    Capture,
    Endpoint,
    Finding,
    Kind,
    Outcome,
    SocketRecord,
    TcpState,
)
from halfclose.agent.core.plan import (
    ActionKind,
    ActionSettings,
    Op,
    SkipReason,
    make_plan,
)
from halfclose.agent.engine.act import Executor
from halfclose.agent.engine.scan import Scanner, ScanSettings
from halfclose.agent.kernel.inetdiag import encode_destroy
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.cli.main import main
from halfclose.lab import Lab, ProxiedPair
from support.scratchnet import lab_factory

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a netns lab")

CLOSE_WAIT = 2  # the lab pod's conntrack CLOSE_WAIT timeout: leaks form in ~2 s


@pytest.fixture
def new_lab(request: pytest.FixtureRequest) -> Callable[..., Lab]:
    """The lab's ``make_lab`` (each lab torn down by it), or a skip with the reason."""
    return lab_factory(request)  # type: ignore[no-any-return]


# -- oracles -----------------------------------------------------------------


def ss_snapshot(netns: str) -> set[tuple[str, str, str]]:
    """Every TCP socket of the netns as (state, local, peer): ``ss -Htan``."""
    out = subprocess.run(
        ["ss", "-N", netns, "-Htan"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    rows = set()
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 5:
            rows.add((f[0], f[3], f[4]))
    return rows


_TIMEOUT = re.compile(r"^(\S+\s+\d+\s+)(\d+)\s")


def conntrack_snapshot(netns: str) -> set[str]:
    """``conntrack -L`` of the netns with the countdown column removed."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "conntrack", "-L"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return {_TIMEOUT.sub(r"\1", line) for line in out.splitlines() if line.strip()}


def touches(row: tuple[str, str, str], pairs: list[ProxiedPair]) -> bool:
    """Does this socket belong to one of ``pairs``?  The app's socket and the
    proxy's downstream leg carry the app endpoint; the upstream leg its own."""
    ends = {str(p.app) for p in pairs} | {str(p.proxy_upstream) for p in pairs}
    _, local, peer = row
    return local in ends or peer in ends


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main([*argv, "--output", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_peer(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["peer"]: f for f in doc["findings"]}


# -- tests --------------------------------------------------------------------


@pytest.mark.kernel
@root_only
def test_kill_removes_exactly_the_leaks_and_their_upstream_pairs(
    new_lab: Callable[..., Lab], capsys: pytest.CaptureFixture[str]
) -> None:
    lab = new_lab(close_wait_timeout=CLOSE_WAIT)
    pod = lab.pod_netns(0)
    leaked = lab.leak(3)
    lab.idle(2)
    lab.live_half_close(2)
    before = ss_snapshot(pod)
    for p in leaked:  # the lab made what we think it made
        assert ("FIN-WAIT-2", str(p.proxy_downstream), str(p.app)) in before

    doc = run_json(["scan", "--netns", pod, "--action", "kill", "--min-idle", "0"], capsys)

    findings = by_peer(doc)
    for p in leaked:
        f = findings[str(p.app)]
        assert (f["kind"], f["action"]) == ("leaked", "killed")
        if f["upstream"] is not None:  # pairing is best-effort; when made, it is right
            assert f["upstream"]["local"] == str(p.proxy_upstream)
            assert f["upstream_closed"] is True
    # Paired or not, the proxy closed one CLOSE-WAIT upstream leg per kill.
    assert doc["kill_summary"]["killed"] == 3
    assert doc["kill_summary"]["upstream_closed"] == 3
    others = [f for f in doc["findings"] if f["peer"] not in {str(p.app) for p in leaked}]
    assert len(others) == 2  # the live half-closes: at-risk, untouched
    assert all(
        (f["kind"], f["action"], f["reason"]) == ("at-risk", "none", "not-leaked") for f in others
    )

    after = ss_snapshot(pod)
    for p in leaked:
        assert not any(r[1] == str(p.proxy_downstream) and r[2] == str(p.app) for r in after)
        assert not any(r[0] == "CLOSE-WAIT" and r[1] == str(p.proxy_upstream) for r in after)
    # Nothing else changed: listeners, idle connections, live half-closes.
    assert {r for r in after if not touches(r, leaked)} == {
        r for r in before if not touches(r, leaked)
    }
    assert any(r[0] == "LISTEN" for r in after)
    assert sum(r[0] == "FIN-WAIT-2" for r in after) == 2


@pytest.mark.kernel
@root_only
def test_max_kills_is_honoured_longest_idle_first(
    new_lab: Callable[..., Lab], capsys: pytest.CaptureFixture[str]
) -> None:
    lab = new_lab(close_wait_timeout=CLOSE_WAIT)
    pod = lab.pod_netns(0)
    lab.leak(3)
    doc = run_json(
        ["scan", "--netns", pod, "--action", "kill", "--min-idle", "0", "--max-kills", "1"],
        capsys,
    )
    actions = sorted((f["action"], f.get("reason")) for f in doc["findings"])
    assert actions == [("killed", None), ("none", "over-max-kills"), ("none", "over-max-kills")]
    killed = next(f for f in doc["findings"] if f["action"] == "killed")
    assert killed["idle_seconds"] == max(f["idle_seconds"] for f in doc["findings"])
    assert sum(r[0] == "FIN-WAIT-2" for r in ss_snapshot(pod)) == 2


@pytest.mark.kernel
@root_only
def test_default_min_idle_keeps_young_leaks(
    new_lab: Callable[..., Lab], capsys: pytest.CaptureFixture[str]
) -> None:
    lab = new_lab(close_wait_timeout=CLOSE_WAIT)
    pod = lab.pod_netns(0)
    lab.leak(1)
    doc = run_json(["scan", "--netns", pod, "--action", "kill"], capsys)
    assert [(f["action"], f["reason"]) for f in doc["findings"]] == [("none", "too-young")]
    assert sum(r[0] == "FIN-WAIT-2" for r in ss_snapshot(pod)) == 1


@pytest.mark.kernel
@root_only
def test_dry_run_leaves_sockets_and_conntrack_identical(
    new_lab: Callable[..., Lab], capsys: pytest.CaptureFixture[str]
) -> None:
    lab = new_lab(close_wait_timeout=CLOSE_WAIT)
    pod = lab.pod_netns(0)
    lab.leak(2)
    lab.live_half_close(1)
    lab.idle(1)
    sockets, entries = ss_snapshot(pod), conntrack_snapshot(pod)
    doc = run_json(
        ["scan", "--netns", pod, "--action", "kill", "--min-idle", "0", "--dry-run"], capsys
    )
    assert sorted(
        (f["kind"], f["action"], f["reason"], f.get("would")) for f in doc["findings"]
    ) == [
        ("at-risk", "none", "not-leaked", None),
        ("leaked", "none", "dry-run", "kill"),
        ("leaked", "none", "dry-run", "kill"),
    ]
    doc = run_json(["scan", "--netns", pod, "--action", "extend-conntrack", "--dry-run"], capsys)
    assert sorted((f["action"], f["reason"], f.get("would")) for f in doc["findings"]) == [
        ("none", "dry-run", "extend"),
        ("none", "not-at-risk", None),
        ("none", "not-at-risk", None),
    ]
    assert ss_snapshot(pod) == sockets
    assert conntrack_snapshot(pod) == entries


@pytest.mark.kernel
@root_only
def test_a_socket_gone_between_scan_and_action_is_already_gone(new_lab: Callable[..., Lab]) -> None:
    lab = new_lab(close_wait_timeout=CLOSE_WAIT)
    pairs = lab.leak(2)
    with NetnsHandle.from_name(lab.pod_netns(0)) as h, Scanner(h) as scanner:
        result = scanner.scan(ScanSettings(min_idle_seconds=0))
        assert [f.kind for f in result.findings] == [Kind.LEAKED, Kind.LEAKED]
        plan = make_plan(
            result.findings,
            result.capture_ports,
            ActionSettings(action=ActionKind.KILL, min_idle_seconds=0),
        )
        assert len(plan.kills) == 2
        # One of them goes away after the scan (here: destroyed behind our back).
        gone = result.findings[0].socket
        scanner.sockdiag.destroy(gone)
        with pytest.raises(OSError) as again:  # the kernel fact the executor relies on
            scanner.sockdiag.destroy(gone)
        assert again.value.errno == errno.ENOENT
        outcomes = Executor(scanner.sockdiag, scanner.conntrack).remediate(plan).outcomes
    assert [(o.outcome, o.reason) for o in outcomes] == [
        (Outcome.SKIPPED, SkipReason.ALREADY_GONE),
        (Outcome.KILLED, None),
    ]
    assert {str(p.app) for p in pairs} == {str(o.finding.socket.peer) for o in outcomes}


def _record(cookie: int) -> SocketRecord:
    return SocketRecord(
        TcpState.FIN_WAIT2,
        Endpoint(ipaddress.ip_address("127.0.0.1"), 15001),
        Endpoint(ipaddress.ip_address("192.0.2.10"), 40000),
        cookie=cookie,
        inode=5,
        uid=0,
        last_data_recv_ms=10**6,
        last_ack_recv_ms=10**6,
    )


def test_a_kill_never_happens_without_a_cookie() -> None:
    """Unit level: the plan refuses it, and so does the SOCK_DESTROY encoder."""
    finding = Finding(Kind.LEAKED, _record(0), None, capture=Capture.RULE, min_silence_seconds=2.0)
    plan = make_plan([finding], {15001}, ActionSettings(action=ActionKind.KILL))
    assert [(d.op, d.reason) for d in plan.decisions] == [(Op.NONE, SkipReason.NO_COOKIE)]
    with pytest.raises(ValueError, match="cookie"):
        encode_destroy(_record(0), seq=1)
    assert encode_destroy(_record(7), seq=1)  # with one, it encodes


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--max-kills", "-1"], "--max-kills"),
        (["--max-kills", "many"], "--max-kills"),
        (["--close-wait-timeout", "0"], "--close-wait-timeout"),
        (["--close-wait-timeout", "99999999"], "--close-wait-timeout"),
        (["--min-idle", "-5"], "--min-idle"),
        (["--action", "nuke"], "--action"),
    ],
)
def test_bad_action_arguments_are_one_line_and_exit_2(
    extra: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before anything is opened or changed: runs without root too.
    assert main(["scan", "--netns", "hc-no-such-netns", "--action", "kill", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and says in err
