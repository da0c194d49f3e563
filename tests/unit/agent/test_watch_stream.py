"""The agent's watch stream: events are newline-ended lines, however the body is cut."""

from __future__ import annotations

from typing import Any

import pytest

from halfclose.agent.kube.client import WatchStream


class _Connection:
    closed = False

    def close(self) -> None:
        self.closed = True


class _Response:
    """A watch body delivered in the given pieces, then a clean end."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def read1(self, _n: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def _events(pieces: list[bytes]) -> tuple[list[Any], _Connection]:
    conn = _Connection()
    stream = WatchStream(conn, _Response(pieces))  # type: ignore[arg-type]
    return list(stream.events()), conn


def test_events_split_anywhere_are_joined() -> None:
    body = b'{"type":"ADDED","n":1}\n{"type":"MODIFIED","n":2}\n'
    for cut in range(1, len(body)):
        got, conn = _events([body[:cut], body[cut:]])
        assert [e["n"] for e in got] == [1, 2]
        assert conn.closed


def test_an_event_cut_off_by_a_clean_end_is_dropped_not_decoded() -> None:
    """A proxy may end the body cleanly between two of its reads (seen in CI
    through the fault proxy): the unterminated rest is no event, and the caller
    resumes from the last whole one."""
    got, conn = _events([b'{"type":"ADDED","n":1}\n{"type":"ADDED","object":{"kind":"Nam'])
    assert got == [{"type": "ADDED", "n": 1}]
    assert conn.closed


def test_a_malformed_whole_line_still_raises() -> None:
    with pytest.raises(ValueError):
        _events([b'{"type":"ADDED","n":1}\n{not json}\n'])
