"""The per-node kill budget: a token bucket over an injected clock (pure).

``maxKillsPerMinute`` bounds how many sockets one agent destroys per minute,
across all pods of its node, so a classification bug (or a storm of genuine
leaks) cannot turn into a node-wide connection massacre.  A bucket rather than
a fixed window: a window lets 2x the budget through around its boundary.
Time is passed in, so the tests drive it without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    """``per_minute`` tokens, refilled continuously, holding at most ``per_minute``.

    Starts full so the first leaks found after start-up are handled at once.
    ``per_minute == 0`` allows nothing (a policy may set that to observe only).
    """

    per_minute: int
    now: float
    _tokens: float = field(init=False)
    _last: float = field(init=False)

    def __post_init__(self) -> None:
        if self.per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        self._tokens = float(self.per_minute)
        self._last = self.now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)  # a clock stepping back adds nothing
        self._last = max(self._last, now)
        self._tokens = min(float(self.per_minute), self._tokens + elapsed * self.per_minute / 60.0)

    def available(self, now: float) -> int:
        """Whole tokens available at ``now``."""
        self._refill(now)
        return int(self._tokens + 1e-9)

    def take(self, wanted: int, now: float) -> int:
        """Take up to ``wanted`` tokens; returns how many were granted."""
        if wanted <= 0:
            return 0
        granted = min(wanted, self.available(now))
        self._tokens -= granted
        return granted

    def give_back(self, count: int) -> None:
        """Return tokens that were granted but not spent (a kill found nothing to kill)."""
        if count > 0:
            self._tokens = min(float(self.per_minute), self._tokens + count)

    def resize(self, per_minute: int, now: float) -> None:
        """Change the budget (a policy edit) keeping the current fill, capped."""
        if per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        self._refill(now)
        self.per_minute = per_minute
        self._tokens = min(self._tokens, float(per_minute))
