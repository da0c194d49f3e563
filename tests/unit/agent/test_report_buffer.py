"""The report buffer: last write wins per pod, bounded, no loss across requeues."""

from __future__ import annotations

from halfclose.agent.kube.reports import PendingReports, PodRef, ReportUpdate, creatable


def update(pod: str, leaked: int | None) -> ReportUpdate:
    status = None if leaked is None else {"leaked": leaked}
    return ReportUpdate(PodRef("ns", pod, f"uid-{pod}"), {"metadata": {}}, status)


def test_last_write_wins_per_pod() -> None:
    buf = PendingReports()
    for n in range(5):
        buf.put(update("a", n))
    buf.put(update("b", 1))
    buf.put(update("a", None))  # "a" became clean: a delete replaces the pending patch
    items = buf.take()
    assert [(u.pod.name, u.status) for u in items] == [("b", {"leaked": 1}), ("a", None)]
    assert len(buf) == 0


def test_put_back_never_overrides_a_newer_update() -> None:
    buf = PendingReports()
    buf.put(update("a", 1))
    buf.put(update("b", 1))
    failed = buf.take()
    buf.put(update("a", 2))  # arrived while the write of a=1 was failing
    for u in failed:
        buf.put_back(u)
    got = {u.pod.name: u.status for u in buf.take()}
    assert got == {"a": {"leaked": 2}, "b": {"leaked": 1}}


def test_bounded_drops_oldest_and_counts() -> None:
    buf = PendingReports(capacity=3)
    for name in "abcde":
        buf.put(update(name, 1))
    assert [u.pod.name for u in buf.take()] == ["c", "d", "e"]
    assert buf.dropped == 2


def test_creatable_owner_reference_never_blocks_or_controls() -> None:
    manifest = {
        "metadata": {"ownerReferences": [{"kind": "Pod", "name": "p", "uid": "u"}]},
        "status": {"leaked": 1},
    }
    obj = creatable(manifest)
    assert obj["metadata"]["ownerReferences"][0]["controller"] is False
    assert obj["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is False
    assert "status" not in obj
    assert "controller" not in manifest["metadata"]["ownerReferences"][0]  # input untouched
