"""The per-node kill budget (token bucket), driven by a fake clock."""

from __future__ import annotations

import pytest

from halfclose.agent.core.ratelimit import TokenBucket


def test_starts_full_and_refills_continuously() -> None:
    bucket = TokenBucket(per_minute=60, now=0.0)
    assert bucket.take(100, now=0.0) == 60
    assert bucket.take(1, now=0.0) == 0
    assert bucket.take(10, now=5.0) == 5  # one per second
    assert bucket.take(10, now=5.5) == 0
    assert bucket.take(100, now=1000.0) == 60  # never above capacity


def test_no_burst_of_twice_the_budget_across_a_window_boundary() -> None:
    bucket = TokenBucket(per_minute=600, now=0.0)
    granted = bucket.take(600, now=59.9) + bucket.take(600, now=60.1)
    assert granted <= 600 + 2  # a fixed window would grant 1200 here


def test_give_back_and_capacity() -> None:
    bucket = TokenBucket(per_minute=10, now=0.0)
    assert bucket.take(10, now=0.0) == 10
    bucket.give_back(3)
    assert bucket.available(now=0.0) == 3
    bucket.give_back(100)
    assert bucket.available(now=0.0) == 10


def test_zero_allows_nothing_and_resize_keeps_fill() -> None:
    bucket = TokenBucket(per_minute=0, now=0.0)
    assert bucket.take(5, now=1000.0) == 0
    bucket.resize(120, now=1000.0)
    assert bucket.take(5, now=1000.0) == 0  # resizing does not mint tokens
    assert bucket.take(5, now=1001.0) == 2
    big = TokenBucket(per_minute=100, now=0.0)
    big.resize(10, now=0.0)
    assert big.available(now=0.0) == 10


def test_clock_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(per_minute=60, now=100.0)
    bucket.take(60, now=100.0)
    assert bucket.take(5, now=50.0) == 0
    assert bucket.take(5, now=101.0) == 1


def test_negative_budget_rejected() -> None:
    with pytest.raises(ValueError):
        TokenBucket(per_minute=-1, now=0.0)
