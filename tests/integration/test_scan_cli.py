"""`halfclose scan` as a user runs it: the JSON contract, the table, and bad input.

Bad input must give exit 2 and exactly one line on stderr, and change nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from halfclose.cli.scan import parse_ports
from support.minimesh import minimesh
from support.scratchnet import run, scratch_netns, skip_unless_root

HALFCLOSE = [sys.executable, "-m", "halfclose"]


def halfclose(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HALFCLOSE, *args], capture_output=True, text=True, timeout=60, check=False, **kw
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    ("text", "ports"),
    [("15001", {15001}), ("15001,15006", {15001, 15006}), (" 1, 65535 ", {1, 65535})],
)
def test_parse_ports(text: str, ports: set[int]) -> None:
    assert parse_ports(text) == ports


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--netns", "x", "--capture-ports", "0"], "out of range"),
        (["--netns", "x", "--capture-ports", "70000"], "out of range"),
        (["--netns", "x", "--capture-ports", "15001,abc"], "invalid port"),
        (["--netns", "x", "--capture-ports", ""], "invalid port"),
        (["--netns", "x", "--min-idle", "-1"], "seconds"),
        (["--pid", "0"], "invalid pid"),
        (["--netns", "x", "--pid", "1"], "not allowed with"),
        ([], "one of the arguments --netns --pid is required"),
        (["--netns", "x", "--output", "yaml"], "invalid choice"),
        (["--netns", "x", "--action", "explode"], "invalid choice"),
    ],
)
def test_malformed_arguments(args: list[str], fragment: str) -> None:
    assert_user_error(halfclose("scan", *args), fragment)


def test_only_the_named_subcommand_is_imported() -> None:
    # `halfclose scan` registers scan alone (the lab and the demo stay
    # unimported); anything else gets every subcommand and the full message.
    code = (
        "import json, sys; from halfclose.cli.main import build_parser; build_parser(['scan']); "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.startswith(('halfclose.lab', 'halfclose.demo', 'halfclose.cli.')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert loaded == ["halfclose.cli.main", "halfclose.cli.remediate", "halfclose.cli.scan"]
    assert_user_error(halfclose("scna"), "choose from 'scan', 'lab', 'demo', 'conntrack'")
    assert halfclose("scan", "--help").returncode == 0


def test_the_collector_is_paused_for_the_command_and_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from halfclose.cli import scan

    seen: list[bool] = []
    monkeypatch.setattr(scan, "_run", lambda _args: seen.append(gc.isenabled()) or 0)
    assert gc.isenabled()
    assert scan.run(argparse.Namespace()) == 0
    assert seen == [False] and gc.isenabled()


@pytest.mark.kernel
def test_missing_netns_and_pid() -> None:
    skip_unless_root()
    assert_user_error(halfclose("scan", "--netns", "hct-0000-nonexistent"), "does not exist")
    assert_user_error(halfclose("scan", "--netns", "/nonexistent/ns"), "does not exist")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert_user_error(halfclose("scan", "--pid", str(pid_max + 1)), "no such process")


@pytest.mark.kernel
def test_a_path_that_is_not_a_netns_cannot_be_entered(tmp_path: Path) -> None:
    skip_unless_root()
    f = tmp_path / "not-a-netns"
    f.write_text("")
    assert_user_error(halfclose("scan", "--netns", str(f)), "is not a network namespace")


@pytest.mark.kernel
def test_a_pid_whose_netns_is_gone_cannot_be_entered() -> None:
    skip_unless_root()
    # A zombie keeps its /proc entry but no longer has namespaces.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(100):
            if Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z"):
                break
            subprocess.run(["sleep", "0.02"], check=True)
        proc = halfclose("scan", "--pid", str(child.pid))
        assert_user_error(proc, f"pid {child.pid}")
    finally:
        child.wait(timeout=10)


@pytest.mark.kernel
def test_not_root_is_a_user_error() -> None:
    skip_unless_root()
    # A forked child drops to nobody and runs the CLI entry point: the real
    # privilege check, with the code already imported (the interpreter may
    # live where nobody cannot read).
    from halfclose.cli.main import main

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            sys.stderr = open(w, "w", closefd=False)  # noqa: SIM115 - pytest captures sys.stderr
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            code = main(["scan", "--pid", str(os.getppid())])
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        stderr = f.read()
    _, status = os.waitpid(pid, 0)
    proc = subprocess.CompletedProcess(["scan"], os.waitstatus_to_exitcode(status), "", stderr)
    assert_user_error(proc, "must run as root")


@pytest.mark.kernel
def test_no_rule_source_readable_and_no_ports(tmp_path: Path) -> None:
    skip_unless_root("nsenter")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nsenter").symlink_to(shutil.which("nsenter") or "/usr/bin/nsenter")
    env = {**os.environ, "PATH": str(bindir)}
    with scratch_netns("cli") as ns:
        assert_user_error(halfclose("scan", "--netns", ns, env=env), "pass --capture-ports")
        # With explicit ports no rule source is needed.
        ok = halfclose(
            "scan", "--netns", ns, "--capture-ports", "15001", "--output", "json", env=env
        )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["capture_ports"] == [15001]


@pytest.mark.kernel
def test_json_and_table_on_real_leaks() -> None:
    skip_unless_root("iptables", "conntrack", "ss", "nsenter")
    with minimesh(leaks=2, live=1) as mm:
        before = run("conntrack", "-L", netns=mm.netns, check=False).stdout.count("\n")
        proc = halfclose("scan", "--netns", mm.netns, "--output", "json", "--processes")
        bare = halfclose("scan", "--netns", mm.netns, "--output", "json")
        table = halfclose("scan", "--pid", str(mm.proxy.pid), "--min-idle", "0")
        after = run("conntrack", "-L", netns=mm.netns, check=False).stdout.count("\n")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["netns"] == mm.netns and doc["capture_ports"] == [15001]
    assert isinstance(doc["duration_seconds"], float) and doc["duration_seconds"] > 0
    kinds = sorted(f["kind"] for f in doc["findings"])
    assert kinds == ["at-risk", "leaked", "leaked"]
    leaked = {f["peer"]: f for f in doc["findings"] if f["kind"] == "leaked"}
    assert set(leaked) == {c.app for c in mm.leaked}
    for c in mm.leaked:
        f = leaked[c.app]
        assert f["local"] == "127.0.0.1:15001" and f["state"] == "FIN-WAIT-2"
        assert f["upstream"] == {"local": c.up, "peer": "203.0.113.10:7777", "state": "CLOSE-WAIT"}
        assert f["pid"] == mm.proxy.pid and f["action"] == "none"
    # Without --processes (as `ss` without -p): the same findings, legs paired
    # by socket uid, and no pid or process name.
    assert bare.returncode == 0, bare.stderr
    unowned = json.loads(bare.stdout)["findings"]
    assert all(f["pid"] is None and f["process"] is None for f in unowned)
    assert sorted(f["kind"] for f in unowned) == kinds
    same = ("local", "peer", "state", "upstream", "capture", "action")
    assert {f["peer"]: {k: f[k] for k in same} for f in unowned if f["kind"] == "leaked"} == {
        peer: {k: f[k] for k in same} for peer, f in leaked.items()
    }
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].startswith(
        f"netns pid:{mm.proxy.pid}: capture ports 15001;"
    )
    assert sum(line.startswith("leaked ") for line in table.stdout.splitlines()) == 2
    assert before == after  # a scan changes nothing


@pytest.mark.kernel
def test_streamed_json_is_the_dict_renderers_on_a_real_scan_and_kill() -> None:
    """The CLI writes ``json_chunks``; it must say what ``to_json_dict`` said."""
    skip_unless_root("iptables", "conntrack", "ss", "nsenter")
    from halfclose.agent.core.outcome import ActionReport, report_only
    from halfclose.agent.engine.report import json_chunks, to_json_dict
    from halfclose.agent.engine.scan import Scanner, ScanSettings
    from halfclose.agent.kernel.netns import NetnsHandle
    from halfclose.cli.scan import ACTIONS

    with (
        minimesh(leaks=3, live=1) as mm,
        NetnsHandle.from_name(mm.netns) as handle,
        Scanner(handle) as scanner,
    ):
        result = scanner.scan(ScanSettings())
        args = argparse.Namespace(min_idle=0.0, max_kills=10, dry_run=False, close_wait_timeout=5)
        reports: list[ActionReport | None] = [
            None,
            report_only(result.findings),
            ACTIONS["kill"](scanner, result, args),  # real kills: kill_summary, upstream_closed
        ]
    for report in reports:
        streamed = "".join(json_chunks(result, report, batch=2))
        old = json.dumps(to_json_dict(result, report), separators=(",", ":"))
        assert json.loads(streamed) == json.loads(old)
        assert streamed == old
    doc = json.loads(streamed)
    assert doc["kill_summary"]["killed"] == 3
    leaked = [f for f in doc["findings"] if f["kind"] == "leaked"]
    assert len(leaked) == 3 and all(f["action"] == "killed" for f in leaked)
    assert all(f["pid"] == mm.proxy.pid and f["upstream"] for f in leaked)
