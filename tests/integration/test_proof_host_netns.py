"""The host netns is never a target by accident (issue 9, design.md §4), on the real system.

``halfclose scan --pid P`` where P lives in the host's network namespace (a
kernel thread, any host process) is refused with exit 2 and one line; the host
netns is scanned only when asked for by path.  Before (commit 33bbaae)
``--pid 2`` silently scanned the host and exited 0.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from halfclose.agent.kernel.netns import host_netns_path, is_kernel_thread
from support.scratchnet import skip_unless_root

pytestmark = pytest.mark.kernel


def halfclose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "halfclose", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_refused(proc: subprocess.CompletedProcess[str], pid: int) -> None:
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pid {pid} is in the host network namespace" in lines[0]
    assert "--netns " in lines[0]  # says how to ask for it on purpose
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def host_reference() -> str:
    try:
        return host_netns_path()
    except OSError as exc:
        pytest.skip(f"no readable reference for the host netns: {exc}")


def test_a_kernel_thread_is_refused_and_the_host_by_path_is_not() -> None:
    skip_unless_root()
    if not is_kernel_thread(2):
        pytest.skip("pid 2 is not kthreadd here (a pid namespace)")
    assert_refused(halfclose("scan", "--pid", "2"), 2)
    by_path = halfclose("scan", "--netns", host_reference(), "--output", "json")
    assert by_path.returncode == 0, by_path.stderr


def test_a_host_process_is_refused() -> None:
    skip_unless_root()
    ref = os.stat(host_reference())
    mine = os.stat("/proc/self/ns/net")
    if (mine.st_dev, mine.st_ino) != (ref.st_dev, ref.st_ino):
        pytest.skip("the tests do not run in the host netns here")
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert_refused(halfclose("scan", "--pid", str(proc.pid)), proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_conntrack_status_refuses_the_host_by_pid_too() -> None:
    skip_unless_root()
    if not is_kernel_thread(2):
        pytest.skip("pid 2 is not kthreadd here (a pid namespace)")
    assert_refused(halfclose("conntrack", "status", "--pid", "2"), 2)
