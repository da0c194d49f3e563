"""A delay queue of keys (controller-runtime's workqueue, minus the threads).

``add_after(key, delay)`` asks for the key to be handed out once ``delay``
has passed; asking again for a key already waiting keeps the *earlier* time
(a burst of conntrack events for one netns is one reconcile, not a hundred).
``pop_due`` hands out due keys earliest-due first, so a netns that keeps
re-queueing itself for "now" goes behind every netns that was due before it:
no key starves another.  Single-threaded by design: only the agent's loop
thread touches it (other threads enqueue through the loop's wake-up).

Two classes: *urgent* work (a leak's proof coming due, an event's scan) and
*routine* work (``routine=True``: the interval scan, an upstream check).  A
key may wait in both, each at its own time; ``pop_due`` hands out due urgent
keys first, then due routine ones (each class earliest first), and a key
handed out leaves both.  So when the loop falls behind in a burst, the
interval scans of idle netns wait and the kills do not; routine work is
bounded (one scan per netns per interval), so nothing waits for long.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# A routine key held back by urgent work is handed out anyway after this long.
ROUTINE_MAX_WAIT = 5.0


class DelayQueue(Generic[K]):
    def __init__(self) -> None:
        self._urgent = _Timeline[K]()
        self._routine = _Timeline[K]()

    def __len__(self) -> int:
        return len(self._urgent.due.keys() | self._routine.due.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._urgent.due or key in self._routine.due

    def add_after(self, key: K, delay: float, now: float, *, routine: bool = False) -> None:
        """Hand ``key`` out at ``now + delay`` at the latest (de-duplicated, earliest wins)."""
        (self._routine if routine else self._urgent).add(key, now + max(0.0, delay))

    def due_at(self, key: K) -> float | None:
        times = [
            t for t in (self._urgent.due.get(key), self._routine.due.get(key)) if t is not None
        ]
        return min(times) if times else None

    def forget(self, key: K) -> None:
        self._urgent.due.pop(key, None)
        self._routine.due.pop(key, None)

    def next_due(self, guard: float = 0.0, now: float | None = None) -> float | None:
        """When ``pop_due`` (with the same ``guard``) next hands a key out, from
        ``now`` on (None: nothing queued)."""
        urgent, routine = self._urgent.first(), self._routine.first()
        if urgent is not None and routine is not None and guard > 0 and now is not None:
            held = max(routine, now) >= urgent - guard  # inside the guard: not before urgent
            starving = routine <= now - ROUTINE_MAX_WAIT
            if held and not starving:
                routine = None
        times = [t for t in (urgent, routine) if t is not None]
        return min(times) if times else None

    def pop_due(self, now: float, limit: int | None = None, *, guard: float = 0.0) -> list[K]:
        """The keys due by ``now``, urgent ones first, each class earliest first
        (at most ``limit``); they leave the queue.  Routine keys only while no
        urgent key comes due within ``guard`` seconds (routine work, a scan,
        cannot be interrupted, and urgent work must not wait behind it), unless
        a routine key has waited ``ROUTINE_MAX_WAIT`` already: nothing starves."""
        out: list[K] = []
        for timeline in (self._urgent, self._routine):
            if timeline is self._routine and guard > 0:
                soon, oldest = self._urgent.first(), self._routine.first()
                starving = oldest is not None and oldest <= now - ROUTINE_MAX_WAIT
                if soon is not None and soon <= now + guard and not starving:
                    break
            while limit is None or len(out) < limit:
                key = timeline.pop(now)
                if key is None:
                    break
                self.forget(key)
                out.append(key)
        return out


class _Timeline(Generic[K]):
    """Keys by due time: a dict (the truth) and a heap (the order)."""

    def __init__(self) -> None:
        self.due: dict[K, float] = {}
        # (due, sequence, key); stale rows (the key's due moved earlier, or it
        # was popped/dropped) are skipped when they surface.
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def add(self, key: K, at: float) -> None:
        known = self.due.get(key)
        if known is not None and known <= at:
            return
        self.due[key] = at
        heapq.heappush(self._heap, (at, next(self._seq), key))

    def first(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop(self, now: float) -> K | None:
        self._drop_stale()
        if not self._heap or self._heap[0][0] > now:
            return None
        _at, _seq, key = heapq.heappop(self._heap)
        return key

    def _drop_stale(self) -> None:
        while self._heap:
            at, _seq, key = self._heap[0]
            if self.due.get(key) == at:
                return
            heapq.heappop(self._heap)
