"""patch-conntrack's sysctl patch and restore on the real kernel (agent/engine/ctpatch.py).

Uses bare scratch network namespaces: the patch is a per-netns sysctl and needs
no traffic.  The lab-based prevention test (the leak does not form) is in
test_prevention.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from halfclose.agent.engine.ctpatch import CLOSE_WAIT_SYSCTL, CloseWaitPatcher
from halfclose.agent.kernel import sysctl
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.cli.main import main
from halfclose.errors import UserError

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces"),
]


@pytest.fixture
def two_netns() -> Iterator[tuple[str, str]]:
    prefix = f"hct-{secrets.token_hex(2)}"
    names = (f"{prefix}-a", f"{prefix}-b")
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def value(name: str | None) -> int:
    if name is None:
        return sysctl.read_int(None, CLOSE_WAIT_SYSCTL)
    with NetnsHandle.from_name(name) as h:
        return sysctl.read_int(h, CLOSE_WAIT_SYSCTL)


def test_patch_changes_only_the_target_and_restore_survives_a_restart(
    two_netns: tuple[str, str], tmp_path: Path
) -> None:
    a, b = two_netns
    root_before, a_before, b_before = value(None), value(a), value(b)
    new = a_before + 1234
    with NetnsHandle.from_name(a) as h:
        report = CloseWaitPatcher(str(tmp_path)).patch(h, new)
        assert (report.before, report.after, report.original) == (a_before, new, a_before)
        assert report.changed
        record = json.loads(Path(report.state_file).read_text())
        assert record["original"] == a_before and record["netns_inode"] == h.inode
    assert (value(None), value(a), value(b)) == (root_before, new, b_before)

    # A new patcher (a restarted process) knows the original from the state file.
    with NetnsHandle.from_name(a) as h:
        restored = CloseWaitPatcher(str(tmp_path)).restore(h)
    assert (restored.before, restored.after, restored.changed) == (new, a_before, True)
    assert value(a) == a_before
    assert list(tmp_path.iterdir()) == []
    with NetnsHandle.from_name(a) as h:
        again = CloseWaitPatcher(str(tmp_path)).restore(h)
    assert not again.changed and again.original is None


def test_patch_is_idempotent_and_keeps_the_first_original(
    two_netns: tuple[str, str], tmp_path: Path
) -> None:
    a, _ = two_netns
    original = value(a)
    patcher = CloseWaitPatcher(str(tmp_path))
    with NetnsHandle.from_name(a) as h:
        first = patcher.patch(h, original + 10)
        second = patcher.patch(h, original + 10)
        third = patcher.patch(h, original + 20)
        assert first.changed and not second.changed and third.changed
        assert (second.before, second.after) == (original + 10, original + 10)
        assert third.original == original
        assert patcher.restore(h).after == original


def test_dry_run_changes_nothing_and_records_nothing(
    two_netns: tuple[str, str], tmp_path: Path
) -> None:
    a, _ = two_netns
    original = value(a)
    with NetnsHandle.from_name(a) as h:
        report = CloseWaitPatcher(str(tmp_path)).patch(h, original + 5, dry_run=True)
    assert report.dry_run and not report.changed and report.after == original + 5
    assert value(a) == original
    assert list(tmp_path.iterdir()) == []


def test_restore_refuses_to_clobber_someone_elses_change(
    two_netns: tuple[str, str], tmp_path: Path
) -> None:
    a, _ = two_netns
    original = value(a)
    patcher = CloseWaitPatcher(str(tmp_path))
    with NetnsHandle.from_name(a) as h:
        patcher.patch(h, original + 10)
        sysctl.write_sysctl(h, CLOSE_WAIT_SYSCTL, str(original + 99))  # an operator's edit
        with pytest.raises(UserError, match="someone changed it"):
            patcher.restore(h)
        assert value(a) == original + 99
        assert patcher.restore(h, force=True).after == original


def test_cli_status_and_restore(
    two_netns: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two_netns
    original = value(a)
    with NetnsHandle.from_name(a) as h:
        CloseWaitPatcher(str(tmp_path)).patch(h, original + 7)
    assert (
        main(
            ["conntrack", "status", "--netns", a, "--state-dir", str(tmp_path), "--output", "json"]
        )
        == 0
    )
    status = json.loads(capsys.readouterr().out)
    assert (status["before"], status["original"]) == (original + 7, original)
    assert (
        main(["conntrack", "restore", "--netns", a, "--state-dir", str(tmp_path), "--dry-run"]) == 0
    )
    assert "would go" in capsys.readouterr().out and value(a) == original + 7
    assert main(["conntrack", "restore", "--netns", a, "--state-dir", str(tmp_path)]) == 0
    assert f"restored {original + 7} -> {original} s" in capsys.readouterr().out
    assert value(a) == original
    assert main(["conntrack", "restore", "--netns", f"{a}-missing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
