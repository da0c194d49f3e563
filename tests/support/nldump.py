"""Replayed kernel messages (tests/data/netlink/*.dump, written by capture.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data" / "netlink"


def load_datagrams(name: str) -> list[bytes]:
    """The datagrams of one dump file, in the order the kernel sent them."""
    datagrams: list[bytes] = []
    current: list[str] | None = None
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("# datagram"):
            if current is not None:
                datagrams.append(bytes.fromhex("".join(current)))
            current = []
        elif line.startswith("#") or not line.strip():
            continue
        elif current is not None:
            current.append(line.strip())
    if current is not None:
        datagrams.append(bytes.fromhex("".join(current)))
    return datagrams


def expected() -> dict[str, Any]:
    return json.loads((DATA / "expected.json").read_text())  # type: ignore[no-any-return]
