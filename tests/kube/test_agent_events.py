"""The agent's Events against the API emulator: a repeated failure is one Event
with a count, as `kubectl get events` shows it, not one object per scan."""

from __future__ import annotations

import time
from typing import Any

import pytest

from halfclose.agent.kube.client import RawClient
from halfclose.agent.kube.reports import PodEvent, PodRef, ReportWriter

pytestmark = pytest.mark.kube

POD = PodRef("shop", "cart", "uid-1")


def _events(kube_api: Any) -> list[dict[str, Any]]:
    return [e for e in kube_api.objects("", "v1", "events", "shop") if e["reason"] == "KillFailed"]


def _write(writer: ReportWriter, *events: PodEvent) -> None:
    for e in events:
        writer.event(e)
    assert writer.wait_idle(10)


def test_repeats_patch_one_event_and_a_deleted_one_starts_anew(kube_api: Any) -> None:
    kube_api.kubectl("create", "namespace", "shop")
    writer = ReportWriter(RawClient(kube_api.client()), "node-a")
    writer.start()
    try:
        now = time.time()
        _write(
            writer, *(PodEvent(POD, "KillFailed", "EPERM", "Warning", at=now + i) for i in range(4))
        )
        (event,) = _events(kube_api)
        assert event["count"] == 4 and event["type"] == "Warning"
        assert event["firstTimestamp"] < event["lastTimestamp"]
        assert event["involvedObject"]["uid"] == "uid-1"

        # The API server's event TTL removed it: the next repeat creates a new one.
        kube_api.kubectl("delete", "event", "-n", "shop", event["metadata"]["name"])
        _write(writer, PodEvent(POD, "KillFailed", "EPERM", "Warning", at=now + 5))
        (again,) = _events(kube_api)
        assert again["metadata"]["name"] != event["metadata"]["name"] and again["count"] == 1

        _write(writer, PodEvent(POD, "KillFailed", "EPERM", "Warning", at=now + 6))
        table = kube_api.kubectl("get", "events", "-n", "shop").stdout
        header, row = table.splitlines()
        assert header.split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
        assert "(x2 over" in row and "Warning" in row and "pod/cart" in row and "EPERM" in row
    finally:
        writer.stop()
