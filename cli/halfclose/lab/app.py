"""The app in a lab pod: makes and holds connections through the sidecar, on request.

``python -m halfclose.lab.app --control /run/halfclose/lab/<prefix>/pod0.sock ...``

Runs in the pod netns as root (not the proxy uid), so its connections to
the upstream service are REDIRECTed to the proxy, and it may read the pod's
conntrack table.  It serves the control channel (``control.py``) with these
operations, each on ``count`` new connections made concurrently:

- ``leak``:  the upstream closes; once the proxy's half-close (FIN) has
  reached us, wait until conntrack has dropped every connection's NAT entry
  (polled, one wait for all), *then* close.  Our FIN no longer matches an
  entry, is not un-NATed and never reaches the proxy: both proxy sockets leak.
- ``idle``:  connections held ESTABLISHED, silent.
- ``live``:  the upstream half-closes; we keep sending a byte every
  ``live_interval`` so the entry stays alive (the proxy's FIN_WAIT2 socket is
  at-risk, not leaked).
- ``late``:  brought to the half-closed state like ``leak``, then closed
  after ``after`` seconds by our own timer, whatever conntrack says.
- ``status``: what is held.

Every reply lists each connection's pair: ``app`` (our endpoint) and
``upstream`` (the proxy's upstream socket's local endpoint, which the
upstream server reports in-band).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2.conntrack import AsyncConntrack

from halfclose.agent.core.classify import DELAYED_ACK_MARGIN_SECONDS
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.lab import control, daemon
from halfclose.lab.settings import MAX_COUNT
from halfclose.lab.upstream import Mode

log = logging.getLogger("lab-app")

PROCESS_NAME = "lab-app"
CONNECT_CONCURRENCY = 256
STEP_TIMEOUT = 30.0  # connect, or see the half-close, for a whole batch
CONNTRACK_POLL = 0.2
# Request padding cycles through this many lengths: pairs within a batch of up
# to PAD_CYCLE connections differ in byte count (a larger batch repeats, and the
# scanner then reports such pairs as undetermined rather than guess).
PAD_CYCLE = 4096


@dataclass(frozen=True, slots=True)
class AppSettings:
    control_path: str
    service_host: str
    service_port: int
    close_wait_timeout: float
    live_interval: float
    max_lifetime: float = 6 * 3600.0
    # The netns whose conntrack decides when to close (a leak): our own, or,
    # for the inbound clients that live outside the pod, the pod's.
    conntrack_netns: str | None = None
    name: str = PROCESS_NAME


@dataclass(slots=True)
class AppConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    app: tuple[str, int]
    upstream: str

    def pair(self) -> dict[str, str]:
        return {"app": f"{self.app[0]}:{self.app[1]}", "upstream": self.upstream}

    def close(self) -> None:
        self.writer.close()


class OpError(Exception):
    """A request could not be done; the message goes back to the caller."""


class App:
    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.idle: list[AppConnection] = []
        self.live: list[AppConnection] = []
        self.late: dict[int, list[AppConnection]] = {}
        self.leaked_total = 0
        self._batches = itertools.count(1)
        self._senders: set[asyncio.Task[None]] = set()
        self._serial = 0
        self._connect_slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

    # -- operations ---------------------------------------------------------

    async def op_leak(self, count: int) -> dict[str, Any]:
        conns = await self._open(Mode.CLOSE, count)
        try:
            await self._await_half_closed(conns)
            await self._await_entries_gone(conns)
        finally:
            # On success this close is the late FIN that is lost; on failure
            # it is an ordinary, early close and nothing leaks.
            for conn in conns:
                conn.close()
        # Part 4 of the proof needs the shortest timeout *plus* the delayed-ACK
        # margin of silence (agent/core/classify.py): answer once that has
        # passed too, so a caller may scan at once and see the leaks proven.
        await asyncio.sleep(DELAYED_ACK_MARGIN_SECONDS)
        self.leaked_total += count
        return {"pairs": [c.pair() for c in conns]}

    async def op_idle(self, count: int) -> dict[str, Any]:
        conns = await self._open(Mode.HOLD, count)
        self.idle += conns
        return {"pairs": [c.pair() for c in conns]}

    async def op_live(self, count: int) -> dict[str, Any]:
        conns = await self._open(Mode.HALF, count)
        try:
            await self._await_half_closed(conns)
        except BaseException:
            for conn in conns:
                conn.close()
            raise
        self.live += conns
        for conn in conns:
            task = asyncio.get_running_loop().create_task(self._keep_sending(conn))
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        return {"pairs": [c.pair() for c in conns]}

    async def op_late(self, count: int, after: float) -> dict[str, Any]:
        conns = await self._open(Mode.CLOSE, count)
        try:
            await self._await_half_closed(conns)
        except BaseException:
            for conn in conns:
                conn.close()
            raise
        batch = next(self._batches)
        self.late[batch] = conns
        asyncio.get_running_loop().call_later(after, self._close_batch, batch)
        return {
            "batch": batch,
            "closes_at": time.time() + after,
            "pairs": [c.pair() for c in conns],
        }

    async def op_status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "idle": len(self.idle),
            "live": len(self.live),
            "late_pending": {str(b): len(c) for b, c in self.late.items()},
            "leaked_total": self.leaked_total,
        }

    # -- steps ----------------------------------------------------------------

    async def _open(self, mode: Mode, count: int) -> list[AppConnection]:
        results = await asyncio.gather(
            *(self._connect(mode) for _ in range(count)), return_exceptions=True
        )
        conns = [r for r in results if isinstance(r, AppConnection)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for conn in conns:
                conn.close()
            raise OpError(f"{len(errors)} of {count} connections failed: {errors[0]!r}")
        return conns

    async def _connect(self, mode: Mode) -> AppConnection:
        async with self._connect_slots:
            async with asyncio.timeout(STEP_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    self.settings.service_host, self.settings.service_port
                )
            try:
                # Real apps send different amounts; identical traffic would make
                # every proxied pair indistinguishable by its byte counters, which
                # is what the scanner pairs downstream and upstream sockets by.
                self._serial += 1
                # Step 2: the scanner allows a +1 (the SYN) on the upstream leg's
                # counters, so lengths one apart would look alike.
                pad = "-" * (2 * (self._serial % PAD_CYCLE))
                writer.write(f"{mode} {pad}\n".encode())
                async with asyncio.timeout(STEP_TIMEOUT):
                    line = await reader.readline()
                word, _, upstream = line.decode(errors="replace").strip().partition(" ")
                if word != "peer":
                    raise OpError(f"unexpected greeting from upstream: {line[:80]!r}")
            except BaseException:
                writer.close()
                raise
            sockname = writer.get_extra_info("sockname")
            return AppConnection(reader, writer, (sockname[0], sockname[1]), upstream)

    async def _await_half_closed(self, conns: Sequence[AppConnection]) -> None:
        """Wait until the proxy's FIN (its shutdown(SHUT_WR)) reached every connection."""

        async def eof(conn: AppConnection) -> None:
            while await conn.reader.read(65536):
                pass

        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await asyncio.gather(*(eof(c) for c in conns))
        except TimeoutError as exc:
            raise OpError(f"the proxy did not half-close within {STEP_TIMEOUT:.0f}s") from exc

    async def _await_entries_gone(self, conns: Sequence[AppConnection]) -> None:
        """Poll conntrack until no connection has a NAT entry left (one wait for all)."""
        # The entry sits in CLOSE_WAIT for close_wait_timeout seconds after
        # the proxy's FIN was ACKed; allow twice that plus slack.
        timeout = 2 * self.settings.close_wait_timeout + 10.0
        deadline = time.monotonic() + timeout
        waiting = {c.app for c in conns}
        while True:
            waiting &= await self._tracked(waiting)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise OpError(
                    f"{len(waiting)} conntrack entries still present after {timeout:.0f}s"
                )
            await asyncio.sleep(CONNTRACK_POLL)

    async def _tracked(self, apps: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of our endpoints still have a conntrack entry towards the service."""
        if self.settings.conntrack_netns is not None:
            return await asyncio.to_thread(self._tracked_in, self.settings.conntrack_netns, apps)
        found: set[tuple[str, int]] = set()
        ct = AsyncConntrack()
        try:
            await ct.setup_endpoint()
            async for entry in await ct.dump_entries():
                orig = entry.tuple_orig
                if (
                    orig.proto == socket.IPPROTO_TCP
                    and orig.daddr == self.settings.service_host
                    and orig.dport == self.settings.service_port
                    and (orig.saddr, orig.sport) in apps
                ):
                    found.add((orig.saddr, orig.sport))
        finally:
            ct.close()
        return found

    def _tracked_in(self, path: str, apps: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """``_tracked`` against another netns's table (a socket created inside it)."""
        found: set[tuple[str, int]] = set()
        with NetnsHandle.from_path(path) as handle:
            ct = Conntrack.open(handle)
            try:
                for entry in ct.dump():
                    orig = entry.original
                    if (
                        str(orig.dst) == self.settings.service_host
                        and orig.dport == self.settings.service_port
                        and (str(orig.src), orig.sport) in apps
                    ):
                        found.add((str(orig.src), orig.sport))
            finally:
                ct.close()
        return found

    async def _keep_sending(self, conn: AppConnection) -> None:
        try:
            while True:
                conn.writer.write(b".")
                await conn.writer.drain()
                await asyncio.sleep(self.settings.live_interval)
        except (OSError, RuntimeError) as exc:
            log.info("live connection %s ended: %s", conn.pair()["app"], exc)
            with contextlib.suppress(ValueError):
                self.live.remove(conn)

    def _close_batch(self, batch: int) -> None:
        for conn in self.late.pop(batch, []):
            conn.close()

    def close_all(self) -> None:
        for task in self._senders:
            task.cancel()
        for conn in [*self.idle, *self.live, *itertools.chain(*self.late.values())]:
            conn.close()

    # -- control channel ------------------------------------------------------

    async def dispatch(self, request: control.Message) -> dict[str, Any]:
        op = request.get("op")
        ops: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
            "leak": self.op_leak,
            "idle": self.op_idle,
            "live": self.op_live,
            "late": self.op_late,
        }
        if op == "status":
            return await self.op_status()
        if op not in ops:
            raise OpError(f"unknown op {op!r}")
        count = request.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
            raise OpError(f"bad count {count!r}: 1..{MAX_COUNT}")
        if op == "late":
            after = request.get("after")
            if not isinstance(after, int | float) or isinstance(after, bool) or after < 0:
                raise OpError(f"bad after {after!r}: seconds >= 0")
            return await self.op_late(count, float(after))
        return await ops[op](count)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                reply = {"ok": True, **await self.dispatch(control.decode(line))}
            except (OpError, ValueError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:
                log.exception("request failed")
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(control.encode(reply))
            await writer.drain()
        except OSError as exc:
            log.info("control connection: %s", exc)
        finally:
            writer.close()

    async def serve(self, stop: asyncio.Event) -> None:
        daemon.raise_open_files_limit()
        path = self.settings.control_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await asyncio.start_unix_server(self.handle, path=path, limit=control.MAX_LINE)
        os.chmod(path, 0o600)
        log.info("control socket %s", path)
        daemon.announce_ready()
        try:
            await stop.wait()
        finally:
            server.close()
            self.close_all()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def parse_args(argv: Sequence[str] | None) -> AppSettings:
    p = argparse.ArgumentParser(prog="python -m halfclose.lab.app", description=__doc__)
    p.add_argument("--control", required=True, help="unix socket path")
    p.add_argument("--service", required=True, help="ip:port the app connects to")
    p.add_argument("--close-wait-timeout", type=float, required=True)
    p.add_argument("--live-interval", type=float, default=1.0)
    p.add_argument("--max-lifetime", type=float, default=6 * 3600.0)
    p.add_argument("--lab", help="the lab's prefix (a label in the process list)")
    p.add_argument("--conntrack-netns", help="netns path whose conntrack to wait on")
    p.add_argument("--name", default=PROCESS_NAME, help="process name (comm)")
    args = p.parse_args(argv)
    host, _, port = args.service.rpartition(":")
    return AppSettings(
        control_path=args.control,
        service_host=host,
        service_port=int(port),
        close_wait_timeout=args.close_wait_timeout,
        live_interval=args.live_interval,
        max_lifetime=args.max_lifetime,
        conntrack_netns=args.conntrack_netns,
        name=args.name,
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    app = App(settings)
    return daemon.run(app.serve, name=settings.name, max_lifetime=settings.max_lifetime)


if __name__ == "__main__":
    sys.exit(main())
