"""The real kube-controller-manager's garbage collector removes a pod's report when
the pod goes: the report's owner reference is all the cleanup it needs (no agent or
operator involved)."""

from __future__ import annotations

import time

import pytest

from halfclose.api import GROUP, REPORT_PLURAL, VERSION
from halfclose.api.report import report_manifest
from support.controlplane import ControlPlane

pytestmark = pytest.mark.kube


def _pod(kube: ControlPlane, name: str) -> dict[str, object]:
    return kube.put_object(
        "",
        "v1",
        "pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app:1"}]},
        },
    )


def test_deleting_a_pod_garbage_collects_its_report(kube: ControlPlane) -> None:
    reports = {}
    for name in ("cart", "pay"):
        pod = _pod(kube, name)
        manifest = report_manifest(
            namespace="shop",
            pod_name=name,
            pod_uid=pod["metadata"]["uid"],  # type: ignore[index]
            node_name="node-a",
            policy="kill",
        )
        reports[name] = kube.put_object(GROUP, VERSION, REPORT_PLURAL, manifest)
    started = time.monotonic()
    kube.delete_object("", "v1", "pods", "cart", "shop")
    kube.wait_for(
        lambda: kube.get_object(GROUP, VERSION, REPORT_PLURAL, "cart", "shop") is None,
        60,
        "the garbage collector to delete the report of the deleted pod",
    )
    print(f"\nreport garbage-collected {time.monotonic() - started:.1f}s after its pod")
    # The other pod's report stays: collection follows the owner's uid, not a name.
    time.sleep(1)
    kept = kube.get_object(GROUP, VERSION, REPORT_PLURAL, "pay", "shop")
    assert kept is not None
    assert kept["metadata"]["uid"] == reports["pay"]["metadata"]["uid"]


def test_a_report_whose_pod_never_existed_is_collected_too(kube: ControlPlane) -> None:
    # A pod deleted before its report was written (the agent lagging behind): the
    # owner's uid resolves to nothing, and the collector removes the orphan.
    manifest = report_manifest(
        namespace="shop",
        pod_name="gone",
        pod_uid="0f0f0f0f-0000-4000-8000-000000000000",
        node_name="node-a",
        policy="kill",
    )
    kube.ensure_namespace("shop")
    kube.put_object(GROUP, VERSION, REPORT_PLURAL, manifest)
    kube.wait_for(
        lambda: kube.get_object(GROUP, VERSION, REPORT_PLURAL, "gone", "shop") is None,
        60,
        "the garbage collector to delete a report owned by a pod that never existed",
    )
