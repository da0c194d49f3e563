"""The agent's Events on the real API server, written as the chart's agent
ServiceAccount: a repeated failure is one Event with a count, as `kubectl get
events` shows it, not one object per scan."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from halfclose.agent.kube.client import RawClient, load_api_client
from halfclose.agent.kube.events import PodEvent
from halfclose.agent.kube.reports import PodRef
from halfclose.agent.kube.writer import ReportWriter
from support.controlplane import ControlPlane

pytestmark = pytest.mark.kube


def _events(kube: ControlPlane) -> list[dict[str, Any]]:
    return [e for e in kube.objects("", "v1", "events", "shop") if e["reason"] == "KillFailed"]


def _columns(header: str, row: str) -> dict[str, str]:
    """A kubectl table row by the header's column offsets (empty cells included)."""
    starts = [m.start() for m in re.finditer(r"(?<!\S)\S+(?: \S+)?(?=\s{2,}|$)", header)]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    values = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(names, values, strict=True))


def _write(writer: ReportWriter, *events: PodEvent) -> None:
    for e in events:
        writer.event(e)
    assert writer.wait_idle(10)


def test_repeats_patch_one_event_and_a_deleted_one_starts_anew(kube: ControlPlane) -> None:
    pod = kube.put_object(
        "",
        "v1",
        "pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": "shop", "name": "cart"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app:1"}]},
        },
    )
    ref = PodRef("shop", "cart", pod["metadata"]["uid"])
    agent = load_api_client(kube.chart_kubeconfig("agent"))
    writer = ReportWriter(RawClient(agent), "node-a")
    writer.start()
    try:
        now = time.time() - 60  # in the past: kubectl prints future times as <invalid>
        _write(
            writer, *(PodEvent(ref, "KillFailed", "EPERM", "Warning", at=now + i) for i in range(4))
        )
        (event,) = _events(kube)
        assert event["count"] == 4 and event["type"] == "Warning"
        assert event["firstTimestamp"] < event["lastTimestamp"]
        assert event["involvedObject"]["uid"] == pod["metadata"]["uid"]

        # The API server's event TTL removed it: the next repeat creates a new one.
        kube.kubectl("delete", "event", "-n", "shop", event["metadata"]["name"])
        _write(writer, PodEvent(ref, "KillFailed", "EPERM", "Warning", at=now + 5))
        (again,) = _events(kube)
        assert again["metadata"]["name"] != event["metadata"]["name"] and again["count"] == 1

        _write(writer, PodEvent(ref, "KillFailed", "EPERM", "Warning", at=now + 6))
        (final,) = _events(kube)
        assert final["count"] == 2
        # `kubectl get events -o wide` has the COUNT; `kubectl events` says "(x2 over ...)".
        header, row = kube.kubectl("get", "events", "-n", "shop", "-o", "wide").stdout.splitlines()
        cells = _columns(header, row)
        assert cells["COUNT"] == "2" and cells["OBJECT"] == "pod/cart"
        assert cells["SOURCE"] == "halfclose-agent, node-a" and cells["MESSAGE"] == "EPERM"
        header, row = kube.kubectl("events", "-n", "shop").stdout.splitlines()
        assert header.split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
        assert "(x2 over" in row and "Warning" in row and "Pod/cart" in row and "EPERM" in row
        # ... and `kubectl describe pod` shows it (events selected by involvedObject).
        described = kube.kubectl("describe", "pod", "-n", "shop", "cart").stdout
        assert "KillFailed" in described.split("Events:")[1]
    finally:
        writer.stop()
    # All of it as the chart's agent, and nothing refused (the one 404: the deleted Event).
    agent_calls = [r for r in kube.requests if r.user.endswith(":halfclose-agent")]
    assert {r.verb for r in agent_calls} >= {"create", "patch"}
    assert [(r.verb, r.code) for r in agent_calls if r.code >= 400] == [("patch", 404)]
