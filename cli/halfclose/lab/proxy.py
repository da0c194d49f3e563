"""The lab's sidecar: an Envoy-like TCP proxy, in the ways that matter for the leak.

``python -m halfclose.lab.proxy --port 15001 --port 15006 --uid 1337``

Like Envoy's tcp_proxy behind an iptables REDIRECT it:

- accepts on the capture ports and recovers where the app meant to go with
  ``getsockopt(SOL_IP, SO_ORIGINAL_DST)``, then dials that as the proxy uid
  (which the NAT rules exempt, so the dial is not redirected back to us);
- copies bytes both ways and propagates a half-close: EOF from one side
  becomes ``shutdown(SHUT_WR)`` towards the other, and the connection is
  closed only when both directions are done.  This is what leaves the
  downstream socket in FIN_WAIT2 (no kernel timer after shutdown) and the
  upstream one in CLOSE_WAIT when the app's late FIN never arrives;
- has no idle timeout unless ``--idle-timeout`` is given (Envoy's default
  is one hour: longer than any test);
- closes the upstream side when the downstream socket fails (e.g.
  ECONNABORTED after SOCK_DESTROY), as Envoy does, so destroying a leaked
  downstream socket also frees its CLOSE_WAIT partner.

Options for the other capture shapes (docs/lab.md):

- ``--dual-stack``: listen on ``[::]`` with IPV6_V6ONLY=0, as ztunnel and any
  proxy binding ``::`` do: IPv4 peers are then held as ``::ffff:a.b.c.d``, and
  SO_ORIGINAL_DST still answers at the IPv4 level for them.
- ``--tproxy-port P``: listen IP_TRANSPARENT on P (Istio's TPROXY mode): an
  accepted socket's local address *is* the original destination (no NAT);
  the dial to the app leaves from 127.0.0.6 over lo, as Envoy's does.
- ``--netns PATH`` (repeatable) with ``--mark M``: be ztunnel: a process of
  another netns that opens its listeners and its upstream sockets *inside*
  each pod's netns (setns on the current thread around socket(), then back:
  a socket stays in the netns it was created in), marking its dials with
  SO_MARK so the pod's rules exempt them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.lab import daemon

log = logging.getLogger("lab-proxy")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h (IP6T_SO_ORIGINAL_DST is also 80)
IP_TRANSPARENT = 19
PROCESS_NAME = "lab-proxy"
LISTEN_BACKLOG = 4096
# Envoy's inbound passthrough source (InboundPassthroughClusterIpv4): the
# TPROXY rules exempt it on lo, so the dial to the app is not captured again.
INBOUND_SOURCE = "127.0.0.6"


@dataclass(frozen=True, slots=True)
class ProxySettings:
    ports: tuple[int, ...]
    uid: int
    gid: int
    idle_timeout: float | None = None
    connect_timeout: float = 10.0
    max_lifetime: float = 6 * 3600.0
    dual_stack: bool = False
    tproxy_ports: tuple[int, ...] = ()
    mark: int | None = None
    netns_paths: tuple[str, ...] = ()
    name: str = PROCESS_NAME


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the app connected before REDIRECT rewrote it.

    IPv4 (also an IPv4 peer of a dual-stack listener, whose conntrack entry is
    IPv4): SOL_IP, a struct sockaddr_in.  Native IPv6: SOL_IPV6, sockaddr_in6.
    """
    if sock.family == socket.AF_INET6 and not sock.getsockname()[0].startswith("::ffff:"):
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, addr), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


def _unmapped(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; everything it sees goes to its Connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.eof = False  # we received the peer's FIN
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.made(self)

    def data_received(self, data: bytes) -> None:
        self.conn.forward(self, data)

    def eof_received(self) -> bool:
        self.conn.half_close(self)
        return True  # keep the socket: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.lost(self, exc)

    # Backpressure: when our send buffer fills, stop reading the other side.
    def pause_writing(self) -> None:
        other = self.conn.other(self)
        if other.transport is not None and not other.lost:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.conn.other(self)
        if other.transport is not None and not other.lost:
            other.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()


class Connection:
    """A downstream (app side) socket and the upstream socket dialled for it."""

    def __init__(
        self, proxy: Proxy, netns: NetnsHandle | None = None, transparent: bool = False
    ) -> None:
        self.proxy = proxy
        self.netns = netns  # where this connection's sockets live (ztunnel: a pod's)
        self.transparent = transparent  # accepted from a TPROXY (IP_TRANSPARENT) listener
        self.downstream = _Side(self)
        self.upstream = _Side(self)
        self._dial: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._last_activity = 0.0

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.downstream else self.downstream

    def made(self, side: _Side) -> None:
        if side is self.upstream:
            return  # _connect continues once create_connection returns
        assert side.transport is not None
        self.proxy.active.add(self)
        # Nothing is read from the app until the upstream exists.
        side.transport.pause_reading()
        sock = side.transport.get_extra_info("socket")
        if self.transparent:
            # TPROXY: no NAT; the socket's own local address is where the
            # client was going (e.g. pod-ip:8080).
            host, port = sock.getsockname()[:2]
            self._touch()
            self._dial = asyncio.get_running_loop().create_task(
                self._connect((_unmapped(host), port))
            )
            return
        try:
            dst = original_destination(sock)
        except OSError:
            log.warning("no original destination (not redirected): closing")
            side.transport.close()
            return
        if dst[1] == sock.getsockname()[1] and _unmapped(dst[0]) == _unmapped(
            sock.getsockname()[0]
        ):
            # Not redirected (someone dialled the capture port itself): dialling
            # the original destination would loop back to us.
            side.transport.close()
            return
        self._touch()
        self._dial = asyncio.get_running_loop().create_task(self._connect(dst))

    async def _connect(self, dst: tuple[str, int]) -> None:
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that
            # arrives in the loop turn the dial completes in.
            async with asyncio.timeout(self.proxy.settings.connect_timeout):
                await self._dial_upstream(dst)
        except (OSError, TimeoutError) as exc:
            log.info("upstream %s:%d: %s", dst[0], dst[1], exc)
            self.downstream.close()
            return
        if self.downstream.lost:
            self.upstream.close()
            return
        assert self.downstream.transport is not None
        self.downstream.transport.resume_reading()

    async def _dial_upstream(self, dst: tuple[str, int]) -> None:
        settings = self.proxy.settings
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        if self.netns is not None:
            # ztunnel's way: the socket is born in the pod's netns.
            sock = self.netns.socket(family, socket.SOCK_STREAM, 0)
        else:
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if settings.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, settings.mark)
            if self.transparent:
                sock.bind((INBOUND_SOURCE, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, dst)
            await asyncio.get_running_loop().create_connection(lambda: self.upstream, sock=sock)
        except BaseException:
            sock.close()
            raise

    def forward(self, side: _Side, data: bytes) -> None:
        self._touch()
        other = self.other(side)
        if other.transport is not None and not other.lost:
            other.transport.write(data)

    def half_close(self, side: _Side) -> None:
        self._touch()
        side.eof = True
        other = self.other(side)
        if self.downstream.eof and self.upstream.eof:
            self.close()  # both directions done: an ordinary close
        elif other.transport is not None and not other.lost and other.transport.can_write_eof():
            # Propagate the half-close (Envoy: shutdown(fd, SHUT_WR)).
            other.transport.write_eof()

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None:
            which = "downstream" if side is self.downstream else "upstream"
            log.info("%s socket failed: %s", which, exc)
        # Either socket gone (error, reset, SOCK_DESTROY) ends the connection:
        # close the other side too, as Envoy does.
        if side is self.downstream and self._dial is not None and not self._dial.done():
            self._dial.cancel()
        self.close()

    def close(self) -> None:
        self.downstream.close()
        self.upstream.close()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.proxy.active.discard(self)

    def _touch(self) -> None:
        timeout = self.proxy.settings.idle_timeout
        if timeout is None:
            return
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        if self._idle is None:
            self._idle = loop.call_later(timeout, self._check_idle)

    def _check_idle(self) -> None:
        timeout = self.proxy.settings.idle_timeout
        assert timeout is not None
        loop = asyncio.get_running_loop()
        left = self._last_activity + timeout - loop.time()
        if left > 0:
            self._idle = loop.call_later(left, self._check_idle)
            return
        log.info("idle timeout: closing")
        self._idle = None
        self.close()


class Proxy:
    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.active: set[Connection] = set()

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        # ztunnel opens every pod's netns once and keeps it (the fd pins it).
        targets: list[NetnsHandle | None] = [
            NetnsHandle.from_path(path) for path in settings.netns_paths
        ] or [None]
        listeners = [
            (target, port, self._listen(target, port))
            for target in targets
            for port in settings.ports
        ]
        # Bound as root (harmless), then serve as the mesh's proxy uid: the
        # NAT rules exempt that uid, which is what lets our dials out.
        daemon.raise_open_files_limit()
        daemon.drop_privileges(settings.uid, settings.gid)
        servers = [
            await loop.create_server(
                self._factory(target, port in settings.tproxy_ports),
                sock=sock,
                backlog=LISTEN_BACKLOG,
            )
            for target, port, sock in listeners
        ]
        log.info(
            "listening on %s%s in %s as uid %d",
            settings.ports,
            " (dual-stack)" if settings.dual_stack else "",
            ", ".join(settings.netns_paths) or "our netns",
            settings.uid,
        )
        daemon.announce_ready()
        await stop.wait()
        for server in servers:
            server.close()
        for conn in list(self.active):
            conn.close()
        for target in targets:
            if target is not None:
                target.close()

    def _factory(self, target: NetnsHandle | None, transparent: bool) -> Callable[[], _Side]:
        return lambda: Connection(self, target, transparent).downstream

    def _listen(self, target: NetnsHandle | None, port: int) -> socket.socket:
        settings = self.settings
        family = socket.AF_INET6 if settings.dual_stack else socket.AF_INET
        if target is not None:
            sock = target.socket(family, socket.SOCK_STREAM, 0)
        else:
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if settings.dual_stack:
            # Set explicitly: the default follows net.ipv6.bindv6only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if port in settings.tproxy_ports:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        # All addresses: outbound redirects arrive on 127.0.0.1, inbound on the pod IP.
        sock.bind(("::" if settings.dual_stack else "0.0.0.0", port))  # noqa: S104
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock


def parse_args(argv: Sequence[str] | None) -> ProxySettings:
    p = argparse.ArgumentParser(prog="python -m halfclose.lab.proxy", description=__doc__)
    p.add_argument("--port", type=int, action="append", required=True, dest="ports")
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, help="default: the uid")
    p.add_argument("--idle-timeout", type=float, help="seconds; default: none")
    p.add_argument("--max-lifetime", type=float, default=6 * 3600.0)
    p.add_argument("--lab", help="the lab's prefix (a label in the process list)")
    p.add_argument("--dual-stack", action="store_true", help="listen on [::], V6ONLY=0")
    p.add_argument(
        "--tproxy-port", type=int, action="append", default=[], dest="tproxy_ports",
        help="listen IP_TRANSPARENT on this port (also give it with --port)",
    )  # fmt: skip
    p.add_argument("--mark", type=lambda v: int(v, 0), help="SO_MARK on upstream dials")
    p.add_argument(
        "--netns", action="append", default=[], dest="netns_paths",
        help="open the listeners and dials inside this netns (repeatable; ztunnel)",
    )  # fmt: skip
    p.add_argument("--name", default=PROCESS_NAME, help="process name (comm)")
    args = p.parse_args(argv)
    return ProxySettings(
        ports=tuple(args.ports),
        uid=args.uid,
        gid=args.uid if args.gid is None else args.gid,
        idle_timeout=args.idle_timeout,
        max_lifetime=args.max_lifetime,
        dual_stack=args.dual_stack,
        tproxy_ports=tuple(args.tproxy_ports),
        mark=args.mark,
        netns_paths=tuple(args.netns_paths),
        name=args.name,
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    proxy = Proxy(settings)
    return daemon.run(proxy.serve, name=settings.name, max_lifetime=settings.max_lifetime)


if __name__ == "__main__":
    sys.exit(main())
