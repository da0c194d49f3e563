"""Socket owners across all of /proc (a fake proc tree: fd links and ns files)."""

from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path

import pytest

from halfclose.agent.core.model import Owner
from halfclose.agent.kernel import procfs


def _proc(root: Path, pid: int, netns: Path, comm: str, sockets: dict[int, int]) -> None:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "fd").mkdir()
    os.symlink(netns, d / "ns" / "net")  # stat() follows: the inode of ``netns``
    (d / "comm").write_text(comm + "\n")
    os.symlink("/dev/null", d / "fd" / "0")
    for fd, inode in sockets.items():
        os.symlink(f"socket:[{inode}]", d / "fd" / str(fd))


def _tree(tmp_path: Path) -> tuple[Path, int]:
    root = tmp_path / "proc"
    pod, node = tmp_path / "pod-netns", tmp_path / "ztunnel-netns"
    pod.write_text("")
    node.write_text("")
    _proc(root, 10, pod, "app", {3: 500})
    # ztunnel: a process of another netns holding sockets of the pod's netns.
    _proc(root, 20, node, "ztunnel", {7: 601, 8: 602})
    # The same inode held twice (inherited across fork): the pod's process wins.
    _proc(root, 5, node, "parent", {4: 500})
    (root / "self").mkdir()  # non-numeric entries are ignored
    return root, pod.stat().st_ino


def test_owners_in_another_netns_are_found(tmp_path: Path) -> None:
    root, pod_ino = _tree(tmp_path)
    owners = procfs.find_owners([601, 602, 0], pod_ino, proc_root=str(root))
    assert owners == {601: Owner(20, "ztunnel", 7), 602: Owner(20, "ztunnel", 8)}


def test_processes_of_the_scanned_netns_are_read_first(tmp_path: Path) -> None:
    root, pod_ino = _tree(tmp_path)
    assert procfs.find_owners([500], pod_ino, proc_root=str(root)) == {500: Owner(10, "app", 3)}
    # Without a netns to prefer, the lowest pid holding it answers.
    procfs.forget_owners()
    assert procfs.find_owners([500], proc_root=str(root)) == {500: Owner(5, "parent", 4)}


def test_unheld_inodes_are_absent(tmp_path: Path) -> None:
    root, pod_ino = _tree(tmp_path)
    assert procfs.find_owners([999], pod_ino, proc_root=str(root)) == {}
    assert procfs.pids_in_netns(pod_ino, str(root)) == [(10, os.getuid())]


def test_a_found_owner_is_rechecked_not_searched_again(tmp_path: Path) -> None:
    root, pod_ino = _tree(tmp_path)
    assert procfs.find_owners([601], pod_ino, proc_root=str(root)) == {601: Owner(20, "ztunnel", 7)}
    # Hide every other process: a remembered owner still answers (one readlink).
    (root / "10" / "fd" / "3").unlink()
    assert procfs.find_owners([601], pod_ino, proc_root=str(root)) == {601: Owner(20, "ztunnel", 7)}
    # The fd now holds another socket: the memory is stale and a fresh search runs.
    (root / "20" / "fd" / "7").unlink()
    os.symlink("socket:[777]", root / "20" / "fd" / "7")
    _proc(root, 30, tmp_path / "pod-netns", "moved", {5: 601})
    assert procfs.find_owners([601], pod_ino, proc_root=str(root)) == {601: Owner(30, "moved", 5)}


def _counting_readlink(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """Count readlink calls per (directory, name) from here on."""
    real = os.readlink
    reads: Counter[tuple[str, str]] = Counter()

    def readlink(path: str, *, dir_fd: int | None = None) -> str:
        where = real(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        reads[where, path] += 1
        return real(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", readlink)
    return reads


def test_a_reused_fd_is_read_once_and_seen_with_its_new_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, pod_ino = _tree(tmp_path)
    assert procfs.find_owners([601], pod_ino, proc_root=str(root)) == {601: Owner(20, "ztunnel", 7)}
    # ztunnel closes fd 7 and opens another socket on it: the remembered
    # owner of 601 is stale, and the link the re-check read names 603.
    (root / "20" / "fd" / "7").unlink()
    os.symlink("socket:[603]", root / "20" / "fd" / "7")
    reads = _counting_readlink(monkeypatch)
    owners = procfs.find_owners([601, 602, 603], pod_ino, proc_root=str(root))
    assert owners == {603: Owner(20, "ztunnel", 7), 602: Owner(20, "ztunnel", 8)}
    assert reads and max(reads.values()) == 1, reads


def test_the_walk_stops_when_every_inode_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, pod_ino = _tree(tmp_path)
    reads = _counting_readlink(monkeypatch)
    assert procfs.find_owners([500], pod_ino, proc_root=str(root)) == {500: Owner(10, "app", 3)}
    # Only the pod's process was read (fd 0, then fd 3 or the other way round).
    assert {where for where, _ in reads} == {str(root / "10" / "fd")}


def test_real_sockets_and_a_reused_fd(tmp_path: Path) -> None:
    # The kernel's own links (no root needed): a proc root holding only this
    # process, so a search for a closed socket's inode ends here.
    root = tmp_path / "proc"
    root.mkdir()
    pid = os.getpid()
    (root / str(pid)).symlink_to(f"/proc/{pid}")
    comm = procfs.process_name(pid)
    netns = os.stat("/proc/self/ns/net").st_ino
    with socket.socket() as a:
        fd, first = a.fileno(), os.fstat(a.fileno()).st_ino
        assert procfs.find_owners([first], netns, proc_root=str(root)) == {
            first: Owner(pid, comm, fd)
        }
    with socket.socket() as b:
        assert b.fileno() == fd  # the lowest free fd: the closed socket's
        second = os.fstat(fd).st_ino
        owners = procfs.find_owners([first, second], netns, proc_root=str(root))
    assert owners == {second: Owner(pid, comm, fd)}
