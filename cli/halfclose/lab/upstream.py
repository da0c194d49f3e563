"""The lab's upstream service: a TCP server told in-band how to end each connection.

``python -m halfclose.lab.upstream --listen 203.0.113.10:7777``

The first line a client sends picks the behaviour (see ``Mode``); the server
answers ``peer <ip>:<port>`` — the address it sees, which is the proxy's
upstream socket's local endpoint (the proxy's dials are not NATed) — and then:

- ``hold``:  keeps the connection open, reading, until the client closes;
- ``half``:  ``shutdown(SHUT_WR)`` (FIN) and keeps reading until the client closes;
- ``close``: closes fully (FIN), the server-side close that starts a leak.

Keeping the protocol in-band keeps the proxy a plain byte pipe, as it must be.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import sys
from collections.abc import Sequence

from halfclose.lab import daemon

log = logging.getLogger("lab-upstream")

PROCESS_NAME = "lab-upstream"
FIRST_LINE_TIMEOUT = 30.0


class Mode(enum.StrEnum):
    HOLD = "hold"
    HALF = "half"
    CLOSE = "close"


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(FIRST_LINE_TIMEOUT):
            line = await reader.readline()
        try:
            # The first word is the mode; the app pads the rest of the line so
            # every connection carries a different byte count (see app.py).
            words = line.decode(errors="replace").split(maxsplit=1)
            mode = Mode(words[0] if words else "")
        except ValueError:
            writer.write(b"error: unknown mode\n")
            return
        host, port = writer.get_extra_info("peername")[:2]
        writer.write(f"peer {host}:{port}\n".encode())
        await writer.drain()
        if mode is Mode.CLOSE:
            return  # the finally's close() sends our FIN
        if mode is Mode.HALF:
            writer.write_eof()
        while await reader.read(65536):
            pass
    except (OSError, TimeoutError) as exc:
        log.debug("connection: %s", exc)
    finally:
        writer.close()


async def serve(host: str, port: int, stop: asyncio.Event) -> None:
    daemon.raise_open_files_limit()
    server = await asyncio.start_server(_handle, host, port, backlog=4096, reuse_address=True)
    log.info("listening on %s:%d", host, port)
    daemon.announce_ready()
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m halfclose.lab.upstream", description=__doc__)
    p.add_argument("--listen", required=True, help="ip:port")
    p.add_argument("--max-lifetime", type=float, default=6 * 3600.0)
    p.add_argument("--lab", help="the lab's prefix (a label in the process list)")
    p.add_argument("--name", default=PROCESS_NAME, help="process name (comm)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    return daemon.run(
        lambda stop: serve(host, int(port), stop),
        name=args.name,
        max_lifetime=args.max_lifetime,
    )


if __name__ == "__main__":
    sys.exit(main())
