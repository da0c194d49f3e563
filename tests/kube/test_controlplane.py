"""The control plane fixture itself: a pytest session that fails, or is killed, leaves
no etcd, kube-apiserver or kube-controller-manager behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.controlplane import locate_assets

ASSETS = locate_assets()
pytestmark = [pytest.mark.kube, pytest.mark.skipif(isinstance(ASSETS, str), reason=str(ASSETS))]

TESTS = Path(__file__).resolve().parents[1]

INNER = """
import json, os, time
from pathlib import Path

def test_inner(kube):
    pids = {n: p.proc.pid for n, p in kube.processes.items()}
    Path(os.environ["HC_OUT"]).write_text(json.dumps({"pids": pids, "workdir": str(kube.workdir)}))
    if os.environ.get("HC_HANG"):
        time.sleep(120)
    assert False, "this test fails on purpose"
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _run_inner(tmp_path: Path, hang: bool) -> tuple[subprocess.Popen[str], Path]:
    test = tmp_path / "test_inner.py"
    test.write_text(INNER)
    out = tmp_path / "out.json"
    env = dict(os.environ, HC_OUT=str(out), PYTHONPATH=str(TESTS))
    if hang:
        env["HC_HANG"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test),
         "-p", "support.controlplane", "--rootdir", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return proc, out


def _wait_gone(pids: dict[str, int], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := [n for n, p in pids.items() if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_failing_session_stops_every_process(tmp_path: Path) -> None:
    proc, out = _run_inner(tmp_path, hang=False)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert "this test fails on purpose" in output
    info = json.loads(out.read_text())
    assert _wait_gone(info["pids"], 1) == []
    assert not Path(info["workdir"]).exists()


def test_a_killed_session_leaves_nothing_running(tmp_path: Path) -> None:
    # SIGKILL: no teardown runs; PR_SET_PDEATHSIG makes the kernel stop the servers.
    proc, out = _run_inner(tmp_path, hang=True)
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        info = json.loads(out.read_text())
        assert all(_alive(p) for p in info["pids"].values())
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        assert _wait_gone(info["pids"], 10) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        if out.exists():
            shutil.rmtree(json.loads(out.read_text())["workdir"], ignore_errors=True)
