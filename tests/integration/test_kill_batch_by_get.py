"""engine.kill's per-socket guards when its re-read goes by GET, not a dump.

A batch of at most ``REREAD_BY_GET_MAX`` sockets (the agent's fast path kills
~20 per netns) is re-read by one GET each; ``test_kill_batch`` (300 sockets)
covers the dump.  The same scenario must come out the same: a revived entry,
a socket gone meanwhile and a record whose cookie names another socket are
each left alone, the rest destroyed.
"""

from __future__ import annotations

import pytest
from integration import test_kill_batch as batch

from halfclose.agent.kernel.sockdiag import REREAD_BY_GET_MAX

pytestmark = pytest.mark.kernel


def test_a_small_batch_keeps_every_per_socket_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "LEAKS", 50)
    assert batch.LEAKS <= REREAD_BY_GET_MAX < 300
    batch.test_batched_kill_keeps_every_per_socket_guard()
