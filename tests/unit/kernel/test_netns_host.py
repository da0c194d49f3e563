"""Telling the host netns (kernel threads, pid 1's) from a fake /proc."""

from __future__ import annotations

from pathlib import Path

import pytest

from halfclose.agent.kernel.netns import PF_KTHREAD, host_netns_path, is_kernel_thread


def fake_proc(tmp_path: Path, pid: int, comm: str, flags: int, *, ns: bool = True) -> None:
    d = tmp_path / str(pid)
    (d / "ns").mkdir(parents=True)
    # Field 9 is flags; comm may hold spaces and parentheses.
    (d / "stat").write_text(f"{pid} ({comm}) S 0 0 0 0 -1 {flags} 0 0 0 0\n")
    if ns:
        (d / "ns" / "net").write_text("")


@pytest.mark.parametrize(
    ("comm", "flags", "kthread"),
    [
        ("kthreadd", PF_KTHREAD | 0x40, True),
        ("a (weird) name", PF_KTHREAD, True),
        ("sleep", 0x400100, False),
    ],
)
def test_kernel_thread_from_stat_flags(
    tmp_path: Path, comm: str, flags: int, kthread: bool
) -> None:
    fake_proc(tmp_path, 2, comm, flags)
    assert is_kernel_thread(2, str(tmp_path)) is kthread


def test_unreadable_stat_is_not_a_kernel_thread(tmp_path: Path) -> None:
    assert is_kernel_thread(99, str(tmp_path)) is False


def test_host_reference_is_pid1_else_kthreadd(tmp_path: Path) -> None:
    fake_proc(tmp_path, 2, "kthreadd", PF_KTHREAD)
    assert host_netns_path(str(tmp_path)) == f"{tmp_path}/2/ns/net"
    fake_proc(tmp_path, 1, "init", 0x400100)
    assert host_netns_path(str(tmp_path)) == f"{tmp_path}/1/ns/net"


def test_no_reference_raises(tmp_path: Path) -> None:
    fake_proc(tmp_path, 2, "not-a-kthread", 0)
    with pytest.raises(OSError):
        host_netns_path(str(tmp_path))
