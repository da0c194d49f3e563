"""Pod network namespaces found without the host's PID namespace (issue 13 §1).

The runtime's bind mounts are made here the way containerd's CNI code makes
them: a network namespace pinned by an nsfs bind mount on a file
(``ip netns add`` does exactly that under /run/netns), then bind-mounted again
into a private directory that plays the role of the chart's read-only
``NETNS_DIR`` (other engineers' namespaces in /run/netns carry the same TEST-NET
addresses, so the shared directory cannot be the test's).  Each namespace holds
its "pod IPs" on an interface.  Both resolvers are checked on the real
kernel: by bind mount + pod IP (the default), and by container ID through
/proc (``agent.hostPID``), and the default one under exactly the chart's default
capabilities (no SYS_PTRACE).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from halfclose.agent.kernel.mountns import (
    MountedNetnsResolver,
    find_mount_by_inode,
    netns_addresses,
    scan_mounts,
)
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.podnetns import PodNetnsResolver
from support.podcgroup import cgroup2_mount
from support.scratchnet import IP, skip_unless_root

pytestmark = pytest.mark.kernel

DEFAULT_CHART_CAPS = "-all,+net_admin,+sys_admin"


class Mounts:
    """Named network namespaces (``hsc-<hex>-<tag>``) and a private directory of
    bind mounts of them (``cni-<tag>``), removed at exit."""

    def __init__(self) -> None:
        self.prefix = f"hsc-{secrets.token_hex(2)}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-netns-"))
        self.names: list[str] = []
        self.mounted: list[Path] = []

    def netns(self, tag: str, *addresses: str, mount: bool = True) -> str:
        name = f"{self.prefix}-{tag}"
        subprocess.run([IP, "netns", "add", name], check=True, timeout=10)
        self.names.append(name)
        ip = [IP, "-n", name]
        # No dummy module here: a veth pair with both ends inside the namespace.
        subprocess.run([*ip, "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p"],
                       check=True, timeout=10)  # fmt: skip
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            prefix = "/64" if ":" in address else "/24"
            subprocess.run([*ip, "addr", "add", address + prefix, "dev", "pod0", *extra],
                           check=True, timeout=10)  # fmt: skip
        subprocess.run([*ip, "link", "set", "pod0", "up"], check=True, timeout=10)
        subprocess.run([*ip, "link", "set", "lo", "up"], check=True, timeout=10)
        if mount:
            self.mount(name, f"cni-{tag}")
        return name

    def mount(self, name: str, entry: str) -> Path:
        target = self.dir / entry
        target.touch()
        subprocess.run(["mount", "--bind", f"/run/netns/{name}", str(target)],
                       check=True, timeout=10)  # fmt: skip
        self.mounted.append(target)
        return target

    def unmount(self, target: Path) -> None:
        subprocess.run(["umount", str(target)], check=False, timeout=10)
        self.mounted.remove(target)
        target.unlink(missing_ok=True)

    def inode(self, name: str) -> int:
        return os.stat(f"/run/netns/{name}").st_ino

    def close(self) -> None:
        for target in list(self.mounted):
            self.unmount(target)
        for name in self.names:
            subprocess.run([IP, "netns", "del", name], check=False, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    skip_unless_root("mount", "umount")
    made = Mounts()
    try:
        yield made
    finally:
        made.close()


def test_addresses_are_read_inside_each_namespace(mounts: Mounts) -> None:
    name = mounts.netns("a", "192.0.2.10", "2001:db8::10")
    with NetnsHandle.from_path(str(mounts.dir / "cni-a")) as handle:
        assert handle.inode == mounts.inode(name)
        # Loopback and the link-local IPv6 address of the interface are left out.
        assert netns_addresses(handle) == {"192.0.2.10", "2001:db8::10"}


def test_pods_are_matched_to_their_mount_by_ip(mounts: Mounts) -> None:
    a = mounts.netns("a", "192.0.2.10", "2001:db8::10")
    b = mounts.netns("b", "192.0.2.11")
    resolver = MountedNetnsResolver(str(mounts.dir), min_rescan_seconds=0)
    where = resolver.resolve(frozenset(), pod_ips=["192.0.2.11"])
    assert where is not None and where.inode == mounts.inode(b)
    assert where.path == str(mounts.dir / "cni-b") and where.pid == 0
    # Dual-stack pods list both; an IPv6-only match works the same.
    where = resolver.resolve(frozenset(), pod_ips=["2001:db8:0::10"])
    assert where is not None and where.inode == mounts.inode(a)
    assert resolver.scans == 1  # both answered from one walk
    assert resolver.resolve(frozenset(), pod_ips=["192.0.2.99"]) is None
    assert resolver.resolve(frozenset(), pod_ips=[]) is None


def test_a_pod_started_later_is_found_by_a_new_walk(mounts: Mounts) -> None:
    mounts.netns("a", "192.0.2.10")
    resolver = MountedNetnsResolver(str(mounts.dir), min_rescan_seconds=0)
    assert resolver.resolve(frozenset(), pod_ips=["192.0.2.10"]) is not None
    c = mounts.netns("c", "192.0.2.12")
    where = resolver.resolve(frozenset(), pod_ips=["192.0.2.12"])
    assert where is not None and where.inode == mounts.inode(c)


def test_a_netns_holding_the_nodes_address_is_refused(mounts: Mounts) -> None:
    """The host's netns bind-mounted there (or a hostNetwork pod's) is never a pod's."""
    mounts.netns("h", "198.51.100.1", "198.51.100.2")
    resolver = MountedNetnsResolver(str(mounts.dir), min_rescan_seconds=0)
    assert resolver.resolve(frozenset(), pod_ips=["198.51.100.2"]) is not None
    assert (
        resolver.resolve(frozenset(), pod_ips=["198.51.100.2"], host_ips=["198.51.100.1"]) is None
    )


def test_an_ip_held_by_two_namespaces_is_ambiguous(mounts: Mounts) -> None:
    mounts.netns("a", "192.0.2.10")
    mounts.netns("stale", "192.0.2.10")
    resolver = MountedNetnsResolver(str(mounts.dir), min_rescan_seconds=0)
    assert resolver.resolve(frozenset(), pod_ips=["192.0.2.10"]) is None


def test_entries_that_are_not_namespaces_are_skipped(mounts: Mounts) -> None:
    mounts.netns("a", "192.0.2.10")
    # A placeholder whose bind mount never propagated, and a stray file.
    (mounts.dir / "cni-placeholder").touch()
    (mounts.dir / "notes.txt").write_text("x")
    found = scan_mounts(str(mounts.dir))
    assert [m.path for m in found] == [str(mounts.dir / "cni-a")]


def test_a_removed_mount_is_not_returned_from_the_cache(mounts: Mounts) -> None:
    mounts.netns("a", "192.0.2.10")
    resolver = MountedNetnsResolver(str(mounts.dir), min_rescan_seconds=3600)
    assert resolver.resolve(frozenset(), pod_ips=["192.0.2.10"]) is not None
    mounts.unmount(mounts.dir / "cni-a")
    assert resolver.resolve(frozenset(), pod_ips=["192.0.2.10"]) is None


def test_a_mount_is_found_again_by_its_inode(mounts: Mounts) -> None:
    """What a restarted agent needs to restore a sysctl it patched (no host PIDs)."""
    b = mounts.netns("b", "192.0.2.11")
    mounts.netns("a", "192.0.2.10")
    assert find_mount_by_inode(str(mounts.dir), mounts.inode(b)) == str(mounts.dir / "cni-b")
    mounts.unmount(mounts.dir / "cni-b")
    assert find_mount_by_inode(str(mounts.dir), mounts.inode(b)) is None


RESOLVE = """
import json, sys
from halfclose.agent.kernel.mountns import MountedNetnsResolver
where = MountedNetnsResolver(sys.argv[1]).resolve(frozenset(), [sys.argv[2]])
print(json.dumps(None if where is None else where.inode))
"""


def test_the_default_resolver_needs_no_ptrace_and_no_host_pids(mounts: Mounts) -> None:
    """Under exactly the default chart's capabilities (NET_ADMIN, SYS_ADMIN)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    b = mounts.netns("b", "192.0.2.11")
    proc = subprocess.run(
        [setpriv, "--bounding-set", DEFAULT_CHART_CAPS, "--inh-caps", "-all",
         sys.executable, "-c", RESOLVE, str(mounts.dir), "192.0.2.11"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == mounts.inode(b)


def test_the_host_pid_resolver_finds_the_same_netns_by_container(mounts: Mounts) -> None:
    """agent.hostPID: container ID -> a process's cgroup -> /proc/<pid>/ns/net."""
    from support.podcgroup import FakeContainers

    root = cgroup2_mount()
    if root is None:
        pytest.skip("no cgroup2 mount")
    b = mounts.netns("b", "192.0.2.11")
    sleeper = subprocess.Popen([IP, "netns", "exec", b, "sleep", "30"])
    try:
        containers = FakeContainers(root)
        try:
            cid = containers.adopt(sleeper.pid)
            by_pid = PodNetnsResolver("/proc").resolve(frozenset({cid}))
            by_ip = MountedNetnsResolver(str(mounts.dir)).resolve(
                frozenset(), pod_ips=["192.0.2.11"]
            )
            assert by_pid is not None and by_ip is not None
            assert by_pid.inode == by_ip.inode == mounts.inode(b)
            assert by_pid.pid == sleeper.pid
        finally:
            containers.close()
        # Why the pid path is the opt-in: without SYS_PTRACE (the default chart) a
        # root process's /proc/<pid>/ns/net is out of reach; the mount is not.
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            probe = "import os, sys; os.open(sys.argv[1], os.O_RDONLY); print('opened')"
            for path, opened in ((f"/proc/{sleeper.pid}/ns/net", False),
                                 (str(mounts.dir / "cni-b"), True)):  # fmt: skip
                proc = subprocess.run(
                    [setpriv, "--bounding-set", DEFAULT_CHART_CAPS, "--inh-caps", "-all",
                     sys.executable, "-c", probe, path],
                    capture_output=True, text=True, timeout=30, check=False,
                )  # fmt: skip
                assert (proc.returncode == 0) is opened, (path, proc.stderr)
                if not opened:
                    assert "PermissionError" in proc.stderr
    finally:
        sleeper.kill()
        sleeper.wait(10)


CLOSE_WAIT = "net.netfilter.nf_conntrack_tcp_timeout_close_wait"


def _close_wait(name: str) -> int:
    out = subprocess.run([IP, "netns", "exec", name, "sysctl", "-n", CLOSE_WAIT],
                         capture_output=True, text=True, check=True, timeout=10)  # fmt: skip
    return int(out.stdout)


@pytest.mark.parametrize("with_netns_dir", [True, False])
def test_a_restarted_agent_restores_a_patched_sysctl_found_by_mount(
    mounts: Mounts, tmp_path: Path, with_netns_dir: bool
) -> None:
    """Sysctl patching without host PIDs: the record of a netns the agent no longer
    watches is restored through the bind mount; without NETNS_DIR the netns cannot
    be found (no /proc/<pid> to go through) and the record would be dropped with
    the pod's sysctl still raised."""
    from halfclose.agent.daemon.remediate import EngineRemediator

    b = mounts.netns("b", "192.0.2.11")
    # conntrack's sysctls exist in a netns once a nat table needs it.
    subprocess.run([IP, "netns", "exec", b, "iptables", "-t", "nat", "-A", "OUTPUT", "-p",
                    "tcp", "--dport", "9", "-j", "REDIRECT", "--to-ports", "15001"],
                   check=True, timeout=10)  # fmt: skip
    before = _close_wait(b)
    no_host_pids = tmp_path / "empty-proc"  # the container's view: no pod processes
    no_host_pids.mkdir()
    state = tmp_path / "state"
    first = EngineRemediator(str(state), "/proc")
    with NetnsHandle.from_path(str(mounts.dir / "cni-b")) as handle:
        first.patch_sysctl(handle, before + 100)
    assert _close_wait(b) == before + 100
    # A new agent (restart) whose pod is no longer selected: restore by inode.
    again = EngineRemediator(
        str(state), str(no_host_pids), netns_dir=str(mounts.dir) if with_netns_dir else None
    )
    again.patcher.proc_root = "/proc"  # sysctls through this host's /proc, as SYSCTL_PROC would
    restored = again.restore_inode(mounts.inode(b))
    if with_netns_dir:
        assert restored and _close_wait(b) == before
    else:
        assert not restored and _close_wait(b) == before + 100  # the bug the mount lookup fixes
