"""Find a pod's network namespace without the host's PID namespace.

containerd and CRI-O pin every pod sandbox's network namespace with a bind
mount in one directory (``/var/run/netns/cni-<uuid>``, exactly what
``ip netns add`` makes).  The chart mounts that directory read-only into the
agent (``NETNS_DIR``); the agent never sees the node's processes.  Which mount
is which pod's is not written anywhere the agent can read, so it is found by
address: each namespace is entered (``NetnsHandle``), its addresses are dumped
over a NETLINK_ROUTE socket made inside it (RTM_GETADDR), and a pod's netns is
the one that holds one of its ``status.podIPs``.

Refused, never matched:
- a netns holding one of the node's addresses (the pods' ``status.hostIPs``):
  that is the host's own netns bind-mounted there, or a hostNetwork pod's;
- an IP held by two namespaces (a stale mount whose pod IP was handed out
  again): ambiguous, so neither is taken until one goes.

The walk costs a setns and a small dump per namespace; it is cached and redone
only on a miss (at most every ``min_rescan_seconds``) or when a cached mount
no longer holds the inode it had.  Loopback and link-local addresses are
ignored: every pod has them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

from halfclose.agent.kernel.netlink import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NetlinkSocket,
    iter_attrs,
    pack_message,
)
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.podnetns import PodNetns
from halfclose.errors import UserError

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index


@dataclass(frozen=True, slots=True)
class MountedNetns:
    """One bind-mounted network namespace and the addresses it holds."""

    path: str
    inode: int
    addresses: frozenset[str]


def normalize(address: str) -> str | None:
    """The canonical text of an IP address (IPv4-mapped IPv6 as IPv4), None if not one."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _interesting(ip: str) -> bool:
    parsed = ipaddress.ip_address(ip)
    return not (parsed.is_loopback or parsed.is_link_local or parsed.is_unspecified)


def getaddr_request(seq: int) -> bytes:
    """RTM_GETADDR dump of every family (AF_UNSPEC)."""
    return pack_message(
        RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    )


def parse_addresses(payloads: Iterable[memoryview]) -> frozenset[str]:
    """The local addresses of RTM_NEWADDR payloads (IFA_LOCAL, else IFA_ADDRESS)."""
    out: set[str] = set()
    for payload in payloads:
        family = payload[0]
        attrs = dict(iter_attrs(payload, IFADDRMSG.size))
        raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
        if raw is None:
            continue
        if family == socket.AF_INET and len(raw) == 4:
            out.add(socket.inet_ntop(socket.AF_INET, bytes(raw)))
        elif family == socket.AF_INET6 and len(raw) == 16:
            text = normalize(socket.inet_ntop(socket.AF_INET6, bytes(raw)))
            if text:
                out.add(text)
    return frozenset(ip for ip in out if _interesting(ip))


def netns_addresses(handle: NetnsHandle) -> frozenset[str]:
    """Every (non-loopback, non-link-local) address of the interfaces of ``handle``'s netns."""
    sock = NetlinkSocket(handle.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE))
    try:
        seq = sock.next_seq()
        return parse_addresses(
            msg.payload for msg in sock.dump(getaddr_request(seq), seq) if msg.type == RTM_NEWADDR
        )
    finally:
        sock.close()


def scan_mounts(directory: str) -> list[MountedNetns]:
    """Every network namespace bind-mounted in ``directory``, with its addresses.

    Entries that are not (or no longer) a netns mount are skipped: a placeholder
    file whose mount did not propagate, a namespace torn down meanwhile.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        log.warning("cannot list %s: %s", directory, exc)
        return []
    found: list[MountedNetns] = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            with NetnsHandle.from_path(path) as handle:
                found.append(MountedNetns(path, handle.inode, netns_addresses(handle)))
        except (UserError, OSError) as exc:
            log.debug("skipping %s: %s", path, exc)
    return found


def find_mount_by_inode(directory: str, inode: int) -> str | None:
    """The bind mount in ``directory`` of the netns with this inode, or None (it is gone)."""
    try:
        names = sorted(os.listdir(directory))
        nsfs = os.stat("/proc/self/ns/net").st_dev  # every namespace file is on nsfs
    except OSError:
        return None
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (nsfs, inode):
                return path
        except OSError:
            continue
    return None


class MountedNetnsResolver:
    """pod IPs -> the bind-mounted netns that holds them, cached (the default resolver).

    A ``PodNetnsSource``: ``resolve`` matches the pod's IPs and refuses the
    node's; container IDs are not needed here.  ``PodNetns.pid``
    is 0: no process is involved, and the path (a bind mount) stays valid as
    long as the runtime keeps the sandbox.
    """

    def __init__(self, directory: str, min_rescan_seconds: float = 1.0) -> None:
        self.directory = directory
        self.min_rescan_seconds = min_rescan_seconds
        self._mounts: list[MountedNetns] = []
        self._last_scan = float("-inf")
        self.scans = 0  # for tests: how often the directory was walked

    def _scan(self) -> None:
        self.scans += 1
        self._last_scan = time.monotonic()
        self._mounts = scan_mounts(self.directory)

    def _match(self, pod_ips: frozenset[str], host_ips: frozenset[str]) -> PodNetns | None:
        holders = [m for m in self._mounts if m.addresses & pod_ips]
        if not holders:
            return None
        if len({m.inode for m in holders}) > 1:
            log.warning(
                "pod IPs %s are held by several network namespaces (%s): not resolved",
                sorted(pod_ips),
                ", ".join(m.path for m in holders),
            )
            return None
        mount = holders[0]
        if mount.addresses & host_ips:
            log.warning(
                "%s holds the node's address %s: the host's or a hostNetwork netns, refused",
                mount.path,
                sorted(mount.addresses & host_ips),
            )
            return None
        try:
            if os.stat(mount.path).st_ino != mount.inode:
                return None  # remounted since the walk: the next walk sees the new one
        except OSError:
            return None
        return PodNetns(inode=mount.inode, pid=0, path=mount.path)

    def resolve(
        self,
        container_ids: frozenset[str],
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns | None:
        del container_ids  # the runtime's mounts are found by address, not by container
        wanted = frozenset(ip for ip in map(normalize, pod_ips) if ip and _interesting(ip))
        hosts = frozenset(ip for ip in map(normalize, host_ips) if ip)
        if not wanted:
            return None
        where = self._match(wanted, hosts)
        if where is None and time.monotonic() - self._last_scan >= self.min_rescan_seconds:
            self._scan()
            where = self._match(wanted, hosts)
        return where

    def invalidate(self) -> None:
        """Forget the walk and allow an immediate one (a pod's netns could not be opened)."""
        self._mounts = []
        self._last_scan = float("-inf")
