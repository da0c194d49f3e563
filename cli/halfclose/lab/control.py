"""The app holder's control channel: one JSON object per line over a unix socket.

A client connects, sends one request line (``{"op": "leak", "count": 3}``)
and reads one reply line (``{"ok": true, ...}`` or ``{"ok": false, "error":
"..."}``).  A filesystem socket in the lab's state dir works across network
namespaces (an abstract one would not), and is reachable only by root.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from halfclose.lab.errors import LabError

Message = dict[str, Any]
MAX_LINE = 16 * 1024 * 1024  # a 5000-pair reply is ~0.5 MB


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not a JSON line: {exc}") from exc
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def request(path: str, message: Message, timeout: float) -> Message:
    """Send one request and return the reply; failures are one-line LabErrors."""
    deadline = time.monotonic() + timeout
    op = message.get("op")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(encode(message))
            buf = bytearray()
            while not buf.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise LabError(f"app holder closed the control connection during {op!r}")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise LabError("app holder reply too long")
        except TimeoutError as exc:
            raise LabError(f"app holder: {op!r} did not finish within {timeout:.0f}s") from exc
        except OSError as exc:
            raise LabError(f"app holder at {path} unreachable: {exc.strerror or exc}") from exc
    reply = decode(bytes(buf))
    if not reply.get("ok"):
        raise LabError(f"app holder: {op}: {reply.get('error', 'failed')}")
    return reply
