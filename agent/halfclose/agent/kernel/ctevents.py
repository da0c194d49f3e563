"""conntrack DESTROY, UPDATE and NEW events (ctnetlink multicast) from one network namespace.

A leak forms at one precise moment: the NAT entry of a proxied connection,
sitting in CLOSE_WAIT, expires (docs/detection.md).  The kernel announces that on
the ctnetlink multicast group NFNLGRP_CONNTRACK_DESTROY, so instead of waiting
for the next poll the agent scans that netns within milliseconds of the entry
going.  The socket must be created inside the watched netns (a netlink socket
talks to the netns it was created in); this module only binds and reads it.

Event delivery: ``net.netfilter.nf_conntrack_events`` is 2 by default on recent
kernels ("on when someone listens"), so subscribing is enough; the agent never
changes it.  On 1 it is on anyway; on 0 no event comes and the agent falls
back to its poll interval — correct, only slower.

Measured on 6.18: the DESTROY of an *expired* entry comes when the kernel's
conntrack GC reaps it, and the GC worker is shared by every netns and paces
itself by the average timeout of all entries — tens of seconds late on a busy
host.  So the agent also listens to UPDATE events: the moment a proxied
entry turns CLOSE_WAIT (the proxy forwarded the upstream's FIN), the event
carries the entry's timeout, i.e. the moment the leak will form, and the
agent schedules a scan for just after it.  A scan's own conntrack lookups
reap the expired entry at once (an expired entry is never returned).

NEW events serve the port-reuse collision (istio#43301, docs/detection.md): when
the app connects again from a leaked socket's port, its SYN is NATed to the
proxy port and conntrack creates an entry whose *reply* tuple is the leaked
socket's; the app hangs until the stale socket goes.  NEW events come for
every connection of the pod, so the socket joins that group only while the
agent knows leaked or at-risk sockets in the netns (``watch_new``): a pod
without any pays nothing, and one with some pays one set lookup per event.

The socket is non-blocking and drained in one go per wakeup.  When the kernel
drops events because we fell behind (ENOBUFS), the caller is told to scan
anyway: a missed event must never mean a missed leak.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import socket
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from halfclose.agent.core.model import FlowTuple
from halfclose.agent.kernel.netlink import (
    NETLINK_NETFILTER,
    iter_attrs,
    iter_messages,
    receive_buffer,
)

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0  # also carries UPDATE events
IPCTNL_MSG_CT_DELETE = 2
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
NFGENMSG = struct.Struct("=BBH")

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_PROTOINFO = 4
CTA_TIMEOUT = 7
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
IPPROTO_TCP = 6
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
# A NEW event is an IPCTNL_MSG_CT_NEW with these flags; an UPDATE has none
# (net/netfilter/nf_conntrack_netlink.c, ctnetlink_conntrack_event).
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

# The UPDATE that starts a leak's countdown: a proxied entry turning CLOSE_WAIT.
COUNTDOWN_STATES = frozenset({"CLOSE_WAIT"})

# include/uapi/linux/netfilter/nf_conntrack_tcp.h, enum tcp_conntrack
TCP_CONNTRACK_STATES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
    "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ConntrackEvent:
    """One TCP conntrack event: destroyed, created or updated; reply tuple, TCP state.

    ``tcp_state`` is None when the kernel sent no protoinfo with the event
    (an update that did not change the state); ``timeout`` is the seconds left,
    sent with updates and new entries.  ``created`` marks a NEW event.
    """

    destroyed: bool
    reply: FlowTuple
    tcp_state: str | None
    timeout: int | None = None
    created: bool = False


@functools.lru_cache(maxsize=4096)
def _address(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # A pod's events name the same few addresses over and over.
    return ipaddress.ip_address(raw)


def _tuple(view: memoryview) -> FlowTuple | None:
    src = dst = None
    sport = dport = proto = 0
    for kind, value in iter_attrs(view):
        if kind == CTA_TUPLE_IP:
            for ip_kind, ip in iter_attrs(value):
                if ip_kind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = _address(bytes(ip))
                elif ip_kind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = _address(bytes(ip))
        elif kind == CTA_TUPLE_PROTO:
            for p_kind, p in iter_attrs(value):
                if p_kind == CTA_PROTO_NUM:
                    proto = p[0]
                elif p_kind == CTA_PROTO_SRC_PORT:
                    sport = int.from_bytes(p[:2], "big")
                elif p_kind == CTA_PROTO_DST_PORT:
                    dport = int.from_bytes(p[:2], "big")
    if proto != IPPROTO_TCP or src is None or dst is None:
        return None
    return FlowTuple(src, sport, dst, dport)


def _tcp_state(view: memoryview) -> str | None:
    for kind, value in iter_attrs(view):
        if kind == CTA_PROTOINFO_TCP:
            for t_kind, t in iter_attrs(value):
                if t_kind == CTA_PROTOINFO_TCP_STATE and len(t) >= 1:
                    idx = t[0]
                    return TCP_CONNTRACK_STATES[idx] if idx < len(TCP_CONNTRACK_STATES) else None
    return None


def parse_events(
    buf: memoryview, update_states: Collection[str] | None = None
) -> Iterator[ConntrackEvent]:
    """Decode the TCP conntrack events in one datagram (other messages skipped).

    ``update_states``: keep only UPDATE events into these TCP states (None:
    all).  Every connection's every state change is an UPDATE; a caller that
    needs only some skips the others before their tuple is decoded.
    """
    for msg in iter_messages(buf):
        if msg.type not in (CT_DELETE, CT_NEW):
            continue
        raw_reply: memoryview | None = None
        state: str | None = None
        timeout: int | None = None
        for kind, value in iter_attrs(msg.payload, NFGENMSG.size):
            if kind == CTA_TUPLE_REPLY:
                raw_reply = value
            elif kind == CTA_PROTOINFO:
                state = _tcp_state(value)
            elif kind == CTA_TIMEOUT and len(value) >= 4:
                timeout = int.from_bytes(value[:4], "big")
        created = msg.type == CT_NEW and bool(msg.flags & NLM_F_CREATE)
        update = msg.type == CT_NEW and not created
        if update and update_states is not None and state not in update_states:
            continue
        reply = _tuple(raw_reply) if raw_reply is not None else None
        if reply is not None:
            yield ConntrackEvent(msg.type == CT_DELETE, reply, state, timeout, created)


def _proxied(event: ConntrackEvent, capture_ports: frozenset[int] | None) -> bool:
    # capture_ports None means "not known yet": let every TCP event through.
    return capture_ports is None or event.reply.sport in capture_ports


def leak_forming(event: ConntrackEvent, capture_ports: frozenset[int] | None) -> bool:
    """Could this destroyed entry have stranded a proxy socket?

    The leak's entry is a proxied connection (reply source = the proxy's
    capture port) destroyed while in CLOSE_WAIT (the proxy half-closed, the
    app had not answered).  Entries that end normally go through TIME_WAIT or
    CLOSE and are not interesting.  A destroy without state is let through.
    """
    return (
        event.destroyed
        and _proxied(event, capture_ports)
        and event.tcp_state in (None, "CLOSE_WAIT", "LAST_ACK", "FIN_WAIT")
    )


def collision_forming(event: ConntrackEvent, stale_replies: Collection[FlowTuple]) -> bool:
    """Is this a new connection whose reply tuple is a known stale socket's?

    ``stale_replies`` are the (normalized) NAT reply tuples of the proxy's
    FIN_WAIT2 sockets the last scan found leaked or at risk.  A NEW entry under
    one of them is the app reusing that socket's port: its SYN is answered by
    the stale socket, not the listener (istio#43301).
    """
    return event.created and event.reply in stale_replies


def leak_countdown(event: ConntrackEvent, capture_ports: frozenset[int] | None) -> int | None:
    """Seconds until a leak can form, when this update starts the countdown.

    A proxied entry entering CLOSE_WAIT: when its timeout runs out with the
    app not having closed, the proxy's FIN_WAIT2 socket is leaked.
    """
    if event.destroyed or event.created or event.tcp_state not in COUNTDOWN_STATES:
        return None
    if event.timeout is None:
        return None
    return event.timeout if _proxied(event, capture_ports) else None


class ConntrackEventSocket:
    """A non-blocking ctnetlink socket subscribed to UPDATE and DESTROY events,
    and to NEW events while ``watch_new(True)``.

    ``sock`` must be an AF_NETLINK/NETLINK_NETFILTER socket created inside the
    watched netns; this object owns it from then on.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.proto != NETLINK_NETFILTER:
            raise ValueError("need a NETLINK_NETFILTER socket")
        self.sock = sock
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # SO_RCVBUFFORCE (33): ride out bursts
            sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 20)
        groups = (1 << (NFNLGRP_CONNTRACK_DESTROY - 1)) | (1 << (NFNLGRP_CONNTRACK_UPDATE - 1))
        sock.bind((0, groups))
        self.overflows = 0
        self.new_events = False

    def watch_new(self, on: bool) -> None:
        """Join (or leave) the NEW group: only while there are stale tuples to match."""
        if on == self.new_events:
            return
        opt = NETLINK_ADD_MEMBERSHIP if on else NETLINK_DROP_MEMBERSHIP
        self.sock.setsockopt(SOL_NETLINK, opt, NFNLGRP_CONNTRACK_NEW)
        self.new_events = on

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(
        self, max_datagrams: int = 256, update_states: Collection[str] | None = None
    ) -> tuple[list[ConntrackEvent], bool]:
        """Read what is queued: (events, overflowed).  Never blocks.

        ``update_states`` as in ``parse_events`` (None: every UPDATE).

        ``overflowed`` is True when the kernel dropped events (ENOBUFS): the
        caller must assume it missed a leak and scan.
        """
        events: list[ConntrackEvent] = []
        overflowed = False
        # The thread's receive buffer (one for all its netlink sockets): each
        # datagram is decoded whole (events copy what they keep) before the next recv.
        buf, view = receive_buffer()
        for _ in range(max_datagrams):  # bounded: a storm cannot pin the thread
            try:
                n = self.sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    overflowed = True
                    continue
                raise
            try:
                events.extend(parse_events(view[:n], update_states))
            except ValueError:
                overflowed = True  # a truncated datagram: treat as lost events
        return events, overflowed

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ConntrackEventSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
