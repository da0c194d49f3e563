"""A delay queue of keys (controller-runtime's workqueue, minus the threads).

``add_after(key, delay)`` asks for the key to be handed out once ``delay``
has passed; asking again for a key already waiting keeps the *earlier* time
(a burst of conntrack events for one netns is one reconcile, not a hundred).
``pop_due`` hands out due keys earliest-due first, so a netns that keeps
re-queueing itself for "now" goes behind every netns that was due before it:
no key starves another.  Single-threaded by design: only the agent's loop
thread touches it (other threads enqueue through the loop's wake-up).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class DelayQueue(Generic[K]):
    def __init__(self) -> None:
        self._due: dict[K, float] = {}
        # (due, sequence, key); stale rows (the key's due moved earlier, or it
        # was popped/dropped) are skipped when they surface.
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def add_after(self, key: K, delay: float, now: float) -> None:
        """Hand ``key`` out at ``now + delay`` at the latest (de-duplicated, earliest wins)."""
        at = now + max(0.0, delay)
        known = self._due.get(key)
        if known is not None and known <= at:
            return
        self._due[key] = at
        heapq.heappush(self._heap, (at, next(self._seq), key))

    def due_at(self, key: K) -> float | None:
        return self._due.get(key)

    def forget(self, key: K) -> None:
        self._due.pop(key, None)

    def next_due(self) -> float | None:
        """When the earliest key is due (None: nothing queued)."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, limit: int | None = None) -> list[K]:
        """The keys due by ``now``, earliest first (at most ``limit``); they leave the queue."""
        out: list[K] = []
        while self._heap and (limit is None or len(out) < limit):
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                break
            _at, _seq, key = heapq.heappop(self._heap)
            del self._due[key]
            out.append(key)
        return out

    def _drop_stale(self) -> None:
        while self._heap:
            at, _seq, key = self._heap[0]
            if self._due.get(key) == at:
                return
            heapq.heappop(self._heap)
