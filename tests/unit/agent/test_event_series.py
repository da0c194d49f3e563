"""Repeated Events fold into one series with a count (client-go's correlator semantics)."""

from __future__ import annotations

from halfclose.agent.kube.events import EventCorrelator, PodEvent
from halfclose.agent.kube.reports import PodRef

POD = PodRef("shop", "cart", "uid-1")


def ev(at: float, message: str = "EPERM", pod: PodRef = POD) -> PodEvent:
    return PodEvent(pod, "KillFailed", message, "Warning", at=at)


def test_repeats_within_the_window_bump_one_series() -> None:
    c = EventCorrelator(window=600)
    first, new = c.observe(ev(0))
    assert new and first.count == 1
    for i, t in enumerate((10, 300, 890), start=2):  # each within 600 s of the last
        series, new = c.observe(ev(t))
        assert not new and series.name == first.name and series.count == i
    assert series.first == 0 and series.last == 890


def test_a_gap_longer_than_the_window_starts_a_new_series() -> None:
    c = EventCorrelator(window=600)
    a, _ = c.observe(ev(0))
    b, new = c.observe(ev(601))
    assert new and b.name != a.name and b.count == 1


def test_different_message_reason_or_pod_incarnation_is_another_series() -> None:
    c = EventCorrelator()
    a, _ = c.observe(ev(0))
    assert c.observe(ev(1, message="ENOENT"))[1]
    assert c.observe(ev(1, pod=PodRef("shop", "cart", "uid-2")))[1]
    assert c.observe(PodEvent(POD, "LeakedSocketsKilled", "EPERM", "Normal", at=1))[1]
    assert c.observe(ev(2))[0].name == a.name


def test_undo_takes_back_only_the_failed_attempt() -> None:
    c = EventCorrelator()
    c.observe(ev(0))
    series, new = c.observe(ev(1))
    assert series.count == 2
    c.undo(ev(1), new)  # the PATCH did not reach the server
    assert c.observe(ev(2))[0].count == 2  # the series survives, its count is right
    _, new = c.observe(ev(3, message="other"))
    c.undo(ev(3, message="other"), new)  # a create that failed leaves no series
    assert c.observe(ev(4, message="other"))[1]


def test_bounded_least_recently_seen_forgotten_first() -> None:
    c = EventCorrelator(capacity=2)
    c.observe(ev(0, "a"))
    c.observe(ev(0, "b"))
    c.observe(ev(1, "a"))  # "a" is now the most recent
    c.observe(ev(2, "c"))  # evicts "b"
    assert not c.observe(ev(3, "a"))[1]
    assert c.observe(ev(3, "b"))[1]
