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
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from halfclose.lab import daemon

log = logging.getLogger("lab-proxy")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
PROCESS_NAME = "lab-proxy"
LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class ProxySettings:
    ports: tuple[int, ...]
    uid: int
    gid: int
    idle_timeout: float | None = None
    connect_timeout: float = 10.0
    max_lifetime: float = 6 * 3600.0


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the app connected before REDIRECT rewrote it (struct sockaddr_in)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


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

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
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
        try:
            dst = original_destination(sock)
        except OSError:
            log.warning("no original destination (not redirected): closing")
            side.transport.close()
            return
        if dst == sock.getsockname()[:2]:
            # Not redirected (someone dialled the capture port itself): dialling
            # the original destination would loop back to us.
            side.transport.close()
            return
        self._touch()
        self._dial = asyncio.get_running_loop().create_task(self._connect(dst))

    async def _connect(self, dst: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self.upstream, dst[0], dst[1]),
                self.proxy.settings.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            log.info("upstream %s:%d: %s", dst[0], dst[1], exc)
            self.downstream.close()
            return
        if self.downstream.lost:
            self.upstream.close()
            return
        assert self.downstream.transport is not None
        self.downstream.transport.resume_reading()

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
        listeners = [_listen(port) for port in self.settings.ports]
        # Bound as root (harmless), then serve as the mesh's proxy uid: the
        # NAT rules exempt that uid, which is what lets our dials out.
        daemon.raise_open_files_limit()
        daemon.drop_privileges(self.settings.uid, self.settings.gid)
        servers = [
            await loop.create_server(
                lambda: Connection(self).downstream, sock=sock, backlog=LISTEN_BACKLOG
            )
            for sock in listeners
        ]
        log.info("listening on %s as uid %d", self.settings.ports, self.settings.uid)
        daemon.announce_ready()
        await stop.wait()
        for server in servers:
            server.close()
        for conn in list(self.active):
            conn.close()


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # All addresses: outbound redirects arrive on 127.0.0.1, inbound on the pod IP.
    sock.bind(("0.0.0.0", port))  # noqa: S104
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
    args = p.parse_args(argv)
    return ProxySettings(
        ports=tuple(args.ports),
        uid=args.uid,
        gid=args.uid if args.gid is None else args.gid,
        idle_timeout=args.idle_timeout,
        max_lifetime=args.max_lifetime,
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    proxy = Proxy(settings)
    return daemon.run(proxy.serve, name=PROCESS_NAME, max_lifetime=settings.max_lifetime)


if __name__ == "__main__":
    sys.exit(main())
