"""The operator against the real control plane (kube-apiserver, etcd, controller manager).

The operator runs in this process (a thread, as ``halfclose-operator`` runs it:
peering on) with the chart's operator ServiceAccount token, so the chart's RBAC
is what it gets.  Policies go in with kubectl, as a user applies them; reports
with the Python client, as the node agent writes them; pods and namespaces are
created through the API (no kubelet: pods have a node name and a phase we set).
What a user sees is read with kubectl, and request counts from the API
server's audit log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from prometheus_client import CollectorRegistry

from halfclose.api import (
    GROUP,
    POLICY_PLURAL,
    REPORT_PLURAL,
    VERSION,
    ScanSummary,
    build_report_status,
    parse_policy,
    report_manifest,
    report_status_json,
    select_policy,
)
from halfclose.operator.handlers import OperatorState, build_operator, run
from halfclose.operator.settings import OperatorSettings
from support.controlplane import ControlPlane, free_port

pytestmark = [pytest.mark.kube, pytest.mark.timeout(180)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEBOUNCE = 0.3
ISTIO_POD = {"security.istio.io/tlsMode": "istio"}
POLICIES_CRD = f"{POLICY_PLURAL}.{GROUP}"
CHART_OPERATOR = "system:serviceaccount:halfclose-system:halfclose-operator"
ADMIN = "halfclose-test-admin"


# ----------------------------------------------------------------------------- cluster


def seed_pod(
    kube: ControlPlane, namespace: str, name: str, node: str = "node-a", **labels: str
) -> dict[str, Any]:
    return kube.put_object(
        "",
        "v1",
        "pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"},
        },
    )


def seed_mesh(kube: ControlPlane) -> dict[str, dict[str, Any]]:
    """shop (3 injected pods on 2 nodes + 1 plain pod), web (1 injected pod)."""
    kube.ensure_namespace("shop", **{"istio-injection": "enabled"})
    kube.ensure_namespace("web", **{"istio-injection": "enabled"})
    pods = {
        "cart": seed_pod(kube, "shop", "cart", "node-a", **ISTIO_POD),
        "pay": seed_pod(kube, "shop", "pay", "node-a", **ISTIO_POD),
        "ship": seed_pod(kube, "shop", "ship", "node-b", **ISTIO_POD),
        "front": seed_pod(kube, "web", "front", "node-b", **ISTIO_POD),
    }
    seed_pod(kube, "shop", "plain", "node-a")
    return pods


def write_report(
    custom: Any, pod: dict[str, Any], policy: str, *, leaked: int, killed: int = 0, at_risk: int = 0
) -> None:
    """Create or update a pod's report, as the agent does (object, then /status)."""
    meta = pod["metadata"]
    status = build_report_status(
        ScanSummary(scanned_at=dt.datetime.now(dt.UTC), leaked=leaked, at_risk=at_risk,
                    killed=killed),
        leaked_alert_threshold=10,
    )  # fmt: skip
    manifest = report_manifest(
        namespace=meta["namespace"],
        pod_name=meta["name"],
        pod_uid=meta["uid"],
        node_name=pod["spec"]["nodeName"],
        policy=policy,
    )
    try:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], REPORT_PLURAL, manifest
        )
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], REPORT_PLURAL, meta["name"],
            {"spec": manifest["spec"]},
        )  # fmt: skip
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, meta["namespace"], REPORT_PLURAL, meta["name"],
        {"status": report_status_json(status)},
    )  # fmt: skip


def apply(kube: ControlPlane, manifest: dict[str, Any] | Path) -> None:
    if isinstance(manifest, Path):
        kube.kubectl("apply", "-f", str(manifest))
    else:
        kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def policy_manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "HalfClosePolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def policy(kube: ControlPlane, name: str) -> dict[str, Any]:
    obj = kube.get_object(GROUP, VERSION, POLICY_PLURAL, name)
    assert obj is not None, f"policy {name} is gone"
    return obj


def status_of(kube: ControlPlane, name: str) -> dict[str, Any]:
    return dict(policy(kube, name).get("status") or {})


def condition(kube: ControlPlane, name: str, type_: str) -> tuple[str, str] | None:
    for cond in status_of(kube, name).get("conditions", []):
        if cond["type"] == type_:
            return cond["status"], cond["reason"]
    return None


def wait_status(
    kube: ControlPlane, name: str, timeout: float = 15.0, **expected: Any
) -> dict[str, Any]:
    """Wait until every ``expected`` status field (camelCase) has its value."""

    def done() -> bool:
        status = status_of(kube, name)
        return all(status.get(k) == v for k, v in expected.items())

    try:
        kube.wait_for(done, timeout=timeout)
    except AssertionError:
        raise AssertionError(
            f"{name}: status {status_of(kube, name)} never had {expected}"
        ) from None
    return status_of(kube, name)


def wait_condition(
    kube: ControlPlane, name: str, type_: str, status: str, reason: str, *, timeout: float = 15.0
) -> None:
    try:
        kube.wait_for(lambda: condition(kube, name, type_) == (status, reason), timeout=timeout)
    except AssertionError:
        raise AssertionError(
            f"{name}: {type_} is {condition(kube, name, type_)}, not {(status, reason)}"
        ) from None


def status_patches(kube: ControlPlane, name: str) -> int:
    """PATCHes of the policy's status since the test began (the audit log)."""
    path = f"/apis/{GROUP}/{VERSION}/{POLICY_PLURAL}/{name}/status"
    return sum(1 for r in kube.requests if r.method == "PATCH" and r.path == path)


# ----------------------------------------------------------------------------- operator


class Running:
    """An operator in a thread, stopped (like SIGTERM) by ``stop()``."""

    def __init__(self, state: OperatorState, thread: threading.Thread, stop: threading.Event):
        self.state, self.thread, self.stop_flag = state, thread, stop
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the operator did not stop"
        assert self.error is None, self.error


@contextlib.contextmanager
def running_operator(
    kube: ControlPlane,
    *,
    priority: int = 100,
    liveness_port: int | None = None,
    kubeconfig: str | None = None,
) -> Iterator[OperatorState]:
    """The operator as ``halfclose-operator`` runs it (peering on), as the chart's
    ServiceAccount unless ``kubeconfig`` says otherwise."""
    settings = OperatorSettings(
        metrics_host="127.0.0.1",
        metrics_port=0,
        liveness_port=None,
        debounce_seconds=DEBOUNCE,
        peering="halfclose",
        priority=priority,
        kubeconfig=kubeconfig or kube.chart_kubeconfig("operator"),
    )
    registry, state = build_operator(settings, metrics_registry=CollectorRegistry())
    stop = threading.Event()
    liveness = f"http://127.0.0.1:{liveness_port}/healthz" if liveness_port else None
    handle: Running

    def target() -> None:
        try:
            run(registry, state, liveness_endpoint=liveness, stop_flag=stop)
        except BaseException as exc:  # reported by stop()
            handle.error = exc

    thread = threading.Thread(target=target, name=f"operator-{priority}", daemon=True)
    handle = Running(state, thread, stop)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not (state.probes and state.probes.ready):
            assert thread.is_alive(), f"the operator exited: {handle.error}"
            assert time.monotonic() < deadline, "the operator did not start"
            time.sleep(0.02)
        yield state
    finally:
        handle.stop()


def sample(state: OperatorState, name: str, **labels: str) -> float | None:
    return state.metrics.registry.get_sample_value(name, labels)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def custom(kube: ControlPlane) -> Any:
    return kubernetes.client.CustomObjectsApi(kube.client())


def described_events(kube: ControlPlane, name: str) -> list[list[str]]:
    """The Events table of ``kubectl describe hcp NAME``: [type, reason, age, from, message]."""
    text = kube.kubectl("describe", "hcp", name).stdout
    _, _, events = text.partition("\nEvents:")
    rows = []
    for line in events.splitlines()[3:]:  # header, underline
        parts = line.split(None, 4)
        if len(parts) == 5:
            rows.append(parts)
    return rows


# ----------------------------------------------------------------------------- tests


def test_policy_status_aggregates_reports(kube: ControlPlane, custom: Any) -> None:
    pods = seed_mesh(kube)
    liveness = free_port()
    with running_operator(kube, liveness_port=liveness) as state:
        apply(kube, EXAMPLES / "istio-kill.yaml")
        wait_condition(kube, "istio-kill", "Ready", "True", "Applied")
        status = wait_status(kube, "istio-kill", matchedPods=4, matchedNamespaces=2)
        assert status["observedGeneration"] == policy(kube, "istio-kill")["metadata"]["generation"]

        write_report(custom, pods["cart"], "istio-kill", leaked=3, killed=5)
        write_report(custom, pods["pay"], "istio-kill", leaked=0, at_risk=2)
        write_report(custom, pods["ship"], "istio-kill", leaked=7, killed=1)
        status = wait_status(
            kube,
            "istio-kill",
            leakedNow=10,
            atRiskNow=2,
            killedTotal=6,
            podsWithFindings=3,
            nodesReporting=2,
        )
        assert [p["pod"] for p in status["topPods"]] == ["ship", "cart", "pay"]
        assert status["topPods"][0] == {
            "namespace": "shop",
            "pod": "ship",
            "node": "node-b",
            "leaked": 7,
            "atRisk": 0,
            "killedTotal": 1,
        }

        # What a user sees.
        table = kube.kubectl("get", "hcp").stdout.splitlines()
        assert table[0].split() == [
            "NAME", "ACTION", "NAMESPACES", "PODS", "LEAKED", "KILLED", "READY", "AGE",
        ]  # fmt: skip
        assert table[1].split()[:7] == ["istio-kill", "KillSockets", "2", "4", "10", "6", "True"]
        reports = kube.kubectl("get", "hcr", "-A").stdout.splitlines()
        assert reports[0].split() == [
            "NAMESPACE", "NAME", "POD", "NODE", "LEAKED", "AT-RISK", "KILLED", "LAST-SCAN", "AGE",
        ]  # fmt: skip
        assert sorted(r.split()[1:7] for r in reports[1:]) == [
            ["cart", "cart", "node-a", "3", "0", "5"],
            ["pay", "pay", "node-a", "0", "2", "0"],
            ["ship", "ship", "node-b", "7", "0", "1"],
        ]

        # A report goes: the aggregate follows.
        custom.delete_namespaced_custom_object(GROUP, VERSION, "shop", REPORT_PLURAL, "ship")
        wait_status(kube, "istio-kill", leakedNow=3, killedTotal=5, nodesReporting=1)
        # A pod goes: the real garbage collector deletes its report (ownerReference),
        # and the pod count drops.
        kube.delete_object("", "v1", "pods", "cart", "shop")
        wait_status(kube, "istio-kill", leakedNow=0, matchedPods=3, podsWithFindings=1)
        # A pod finishes: it leaves the count (the watch's field selector drops it).
        kube.request(
            "PATCH",
            "/api/v1/namespaces/shop/pods/pay/status",
            {"status": {"phase": "Succeeded"}},
            content_type="application/merge-patch+json",
        )
        wait_status(kube, "istio-kill", matchedPods=2)

        # Metrics, readiness, liveness.
        assert sample(state, "halfclose_operator_policy_leaked_sockets", policy="istio-kill") == 0
        assert sample(state, "halfclose_operator_policies", ready="True") == 1
        assert sample(state, "halfclose_operator_reports") == 1
        assert (
            sample(state, "halfclose_operator_reconcile_total", kind="HalfClosePolicy", result="ok")
            or 0
        ) >= 1
        assert state.probes is not None and state.probes.port
        code, text = http_get(state.probes.port, "/metrics")
        assert code == 200 and 'halfclose_operator_policies{ready="True"} 1.0' in text
        assert http_get(state.probes.port, "/readyz")[0] == 200
        code, text = http_get(liveness, "/healthz")
        assert code == 200 and json.loads(text)["policies"] == 1
    print("\n$ kubectl get hcp\n" + "\n".join(table))
    print("$ kubectl get hcr -A\n" + "\n".join(reports))


def test_events_show_in_kubectl_describe(kube: ControlPlane) -> None:
    """Issue 10: kopf filed them where ``kubectl describe`` does not look (Events: <none>)."""
    seed_mesh(kube)
    with running_operator(kube):
        apply(kube, policy_manifest("shop-only", namespaces=["shop"]))
        wait_condition(kube, "shop-only", "Ready", "True", "Applied")
        apply(kube, policy_manifest("shop-only", namespaces=["gone"]))
        wait_condition(kube, "shop-only", "Ready", "False", "NoMatchingNamespaces")
        rows = kube.wait_for(
            lambda: (r := described_events(kube, "shop-only")) and len(r) >= 3 and r,
            timeout=10,
            what="three Events in kubectl describe",
        )
    print("\n" + "\n".join("  ".join(r) for r in rows))
    seen = {(r[0], r[1], r[3]) for r in rows}
    assert seen >= {
        ("Normal", "Valid", "halfclose-operator"),
        ("Normal", "Applied", "halfclose-operator"),
        ("Warning", "NoMatchingNamespaces", "halfclose-operator"),
    }, rows
    warning = next(r for r in rows if r[1] == "NoMatchingNamespaces")
    assert warning[4].startswith("Ready=False: namespaces ['gone'] do not exist")


def test_no_finalizer_deleting_policy_and_crd_never_wait_for_the_operator(
    kube: ControlPlane,
) -> None:
    """Issue 10: kopf's timer put a finalizer on every policy; with the operator
    stopped, ``kubectl delete hcp`` hung and the CRD stuck in Terminating.  An
    upgraded operator removes the finalizer an older one left."""
    seed_mesh(kube)
    # A policy as the operator before issue 10 left it: kopf's finalizer and annotation.
    legacy = policy_manifest("legacy", namespaces=["elsewhere"])
    legacy["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    legacy["metadata"]["annotations"] = {"halfclose.io/last-handled-configuration": "{}"}
    apply(kube, legacy)
    with running_operator(kube):
        apply(kube, policy_manifest("one", namespaces=["shop"]))
        apply(kube, policy_manifest("two", namespaces=["web"]))
        wait_condition(kube, "one", "Ready", "True", "Applied")
        wait_condition(kube, "two", "Ready", "True", "Applied")
        wait_condition(kube, "legacy", "Ready", "False", "NoMatchingNamespaces")
        kube.wait_for(
            lambda: not policy(kube, "legacy")["metadata"].get("finalizers"),
            what="the old operator's finalizer to be removed",
        )
        time.sleep(4 * DEBOUNCE)  # every pass done; the operator would have added it by now
    for name in ("one", "two", "legacy"):
        meta = policy(kube, name)["metadata"]
        assert not meta.get("finalizers"), meta
        assert "halfclose.io/last-handled-configuration" not in meta.get("annotations", {}), meta
    # The operator is stopped: nothing could remove a finalizer now.
    started = time.monotonic()
    kube.kubectl("delete", "hcp", "one", "--timeout=20s", timeout=30)
    assert kube.get_object(GROUP, VERSION, POLICY_PLURAL, "one") is None
    kube.kubectl("delete", "crd", POLICIES_CRD, "--timeout=30s", timeout=40)
    kube.wait_for(
        lambda: (
            kube.get_object("apiextensions.k8s.io", "v1", "customresourcedefinitions", POLICIES_CRD)
            is None
        ),
        timeout=30,
        what="the CRD to be gone",
    )
    elapsed = time.monotonic() - started
    print(f"\npolicy and CRD (with a policy left) deleted in {elapsed:.1f}s, no operator running")
    assert elapsed < 30


def test_status_writes_are_debounced(kube: ControlPlane, custom: Any) -> None:
    pods = seed_mesh(kube)
    with running_operator(kube) as state:
        apply(kube, EXAMPLES / "istio-report-only.yaml")
        wait_status(kube, "istio-report-only", matchedPods=4)
        before = status_patches(kube, "istio-report-only")
        started = time.monotonic()
        updates = 0
        for leaked in range(1, 31):
            for name in ("cart", "pay", "ship"):
                write_report(custom, pods[name], "istio-report-only", leaked=leaked)
                updates += 1
        wait_status(kube, "istio-report-only", leakedNow=90)
        elapsed = time.monotonic() - started
        time.sleep(2 * DEBOUNCE)
        writes = status_patches(kube, "istio-report-only") - before
        total = sample(state, "halfclose_operator_status_writes_total")
    # At most one write per debounce interval (plus the one that catches up).
    assert 1 <= writes <= elapsed / DEBOUNCE + 2, (writes, elapsed)
    assert writes < updates / 5, (writes, updates)
    assert total == writes + before
    print(f"\n{updates} report updates in {elapsed:.1f}s -> {writes} policy status writes")


def test_policies_the_schema_rejects(kube: ControlPlane) -> None:
    """The messages the real API server prints (CEL rules and schema)."""
    cases = [
        (
            policy_manifest("a", namespaces=["shop"], conntrack={"strategy": "Sysctl"}),
            ["spec.conntrack", "conntrack settings apply only to action PatchConntrack"],
        ),
        (
            policy_manifest("b", namespaces=["shop"], thresholds={"minIdleSeconds": -1}),
            ["spec.thresholds.minIdleSeconds", "should be greater than or equal to 0"],
        ),
        (
            policy_manifest("c", namespaces=["shop"], action="Kill"),
            ["spec.action", 'Unsupported value: "Kill"', '"KillSockets"'],
        ),
        (
            policy_manifest("d", podSelector={"matchLabels": {"app": "web"}}),
            ["set namespaces, namespaceSelector or both"],
        ),
        (
            policy_manifest("e", namespaces=["shop"], capturePorts=[15001, 70000]),
            ["spec.capturePorts[1]", "should be less than or equal to 65535"],
        ),
    ]
    for manifest, fragments in cases:
        proc = kube.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)
        assert proc.returncode != 0, manifest
        for fragment in fragments:
            assert fragment in proc.stderr, (fragment, proc.stderr)
        assert kube.get_object(GROUP, VERSION, POLICY_PLURAL, manifest["metadata"]["name"]) is None


def test_invalid_beyond_the_schema_and_selectors_matching_nothing(kube: ControlPlane) -> None:
    seed_mesh(kube)
    with running_operator(kube):
        # The API server takes it (a schema cannot check map keys); the operator does not.
        apply(
            kube,
            policy_manifest(
                "bad-key", namespaces=["shop"], podSelector={"matchLabels": {"bad key": "x"}}
            ),
        )
        apply(kube, policy_manifest("no-ns", namespaces=["nope"]))
        apply(
            kube,
            policy_manifest(
                "no-pods", namespaceSelector={}, podSelector={"matchLabels": {"app": "none"}}
            ),
        )
        wait_condition(kube, "bad-key", "Accepted", "False", "InvalidSpec")
        wait_condition(kube, "no-ns", "Ready", "False", "NoMatchingNamespaces")
        wait_condition(kube, "no-pods", "Ready", "False", "NoMatchingPods")
        accepted = next(
            c for c in status_of(kube, "bad-key")["conditions"] if c["type"] == "Accepted"
        )
        assert "label key 'bad key'" in accepted["message"]

        # Fixing the spec is picked up, with a new observedGeneration.
        apply(kube, policy_manifest("no-ns", namespaces=["web"]))
        wait_condition(kube, "no-ns", "Ready", "True", "Applied")
        assert status_of(kube, "no-ns")["observedGeneration"] == 2
        kube.wait_for(
            lambda: any(r[1] == "Applied" for r in described_events(kube, "no-ns")),
            what="the Applied Event",
        )
    events = {
        (e["involvedObject"]["name"], e["type"], e["reason"])
        for e in kube.objects("", "v1", "events", "default")
    }
    assert ("bad-key", "Warning", "InvalidSpec") in events
    assert ("no-ns", "Warning", "NoMatchingNamespaces") in events
    assert ("no-ns", "Normal", "Applied") in events


def test_overlapping_policies(kube: ControlPlane, custom: Any) -> None:
    pods = seed_mesh(kube)
    with running_operator(kube):
        apply(kube, policy_manifest("older", namespaces=["shop"], action="KillSockets"))
        wait_condition(kube, "older", "Ready", "True", "Applied")
        time.sleep(1.1)  # creationTimestamp has one-second resolution
        apply(kube, EXAMPLES / "istio-report-only.yaml")
        apply(kube, policy_manifest("shadowed", namespaces=["shop"]))

        wait_condition(kube, "istio-report-only", "Overlapping", "True", "OverlapLost")
        wait_status(kube, "istio-report-only", matchedPods=1)  # web/front only
        wait_condition(kube, "older", "Overlapping", "True", "OverlapWon")
        wait_condition(kube, "shadowed", "Ready", "False", "AllPodsClaimed")
        assert status_of(kube, "older")["matchedPods"] == 4  # incl. the plain pod

        # The agent's choice per pod is the same rule.
        policies = [
            parse_policy(policy(kube, n)) for n in ("older", "istio-report-only", "shadowed")
        ]
        winner = select_policy(policies, {"istio-injection": "enabled"}, "shop", ISTIO_POD)
        assert winner is not None and winner.name == "older"

        # The winner goes: its reports go too, and the next oldest takes the pods.
        write_report(custom, pods["cart"], "older", leaked=2)
        wait_status(kube, "older", leakedNow=2)
        kube.kubectl("delete", "hcp", "older", "--timeout=20s")
        kube.wait_for(
            lambda: not kube.objects(GROUP, VERSION, REPORT_PLURAL, "shop"),
            timeout=10,
            what="the deleted policy's reports to go",
        )
        wait_condition(kube, "istio-report-only", "Overlapping", "True", "OverlapWon")
        wait_status(kube, "istio-report-only", matchedPods=4)
        # shadowed keeps what istio-report-only does not select: the pod without a sidecar.
        wait_condition(kube, "shadowed", "Ready", "True", "Applied")
        wait_condition(kube, "shadowed", "Overlapping", "True", "OverlapLost")
        wait_status(kube, "shadowed", matchedPods=1)


def test_restart_converges_to_the_same_status(kube: ControlPlane, custom: Any) -> None:
    pods = seed_mesh(kube)
    with running_operator(kube):
        apply(kube, EXAMPLES / "istio-report-only.yaml")
        apply(kube, policy_manifest("quiet", namespaces=["web"]))
        write_report(custom, pods["cart"], "istio-report-only", leaked=4)
        wait_status(kube, "istio-report-only", leakedNow=4)
        # overlap: quiet is newer than istio-report-only for web/front
        wait_condition(kube, "quiet", "Ready", "False", "AllPodsClaimed")
        time.sleep(3 * DEBOUNCE)
    quiet_before = policy(kube, "quiet")

    # Changes while no operator runs.
    write_report(custom, pods["ship"], "istio-report-only", leaked=6, killed=2)
    custom.delete_namespaced_custom_object(GROUP, VERSION, "shop", REPORT_PLURAL, "cart")
    seed_pod(kube, "shop", "back", "node-c", **ISTIO_POD)

    with running_operator(kube) as state:
        status = wait_status(
            kube,
            "istio-report-only",
            leakedNow=6,
            killedTotal=2,
            matchedPods=5,
            nodesReporting=1,
        )
        time.sleep(4 * DEBOUNCE)  # several intervals: nothing more to write
        writes = sample(state, "halfclose_operator_status_writes_total")
    assert writes == 1, "exactly the changed policy's status, once"
    assert status_of(kube, "istio-report-only") == status
    quiet_after = policy(kube, "quiet")
    assert quiet_after["metadata"]["resourceVersion"] == quiet_before["metadata"]["resourceVersion"]


def test_api_errors_and_watch_drops_are_survived(kube: ControlPlane, custom: Any) -> None:
    """Through the fault proxy: failing status writes, cut watches, a failing re-list."""
    pods = seed_mesh(kube)
    with kube.fault_proxy() as proxy:
        config = kube.chart_kubeconfig("operator", server=proxy.url)
        with running_operator(kube, kubeconfig=config):
            apply(kube, EXAMPLES / "istio-report-only.yaml")
            wait_status(kube, "istio-report-only", matchedPods=4)

            # Status writes fail for a while.
            status_path = rf"/{POLICY_PLURAL}/istio-report-only/status"
            proxy.fail(3, 500, method="PATCH", path_regex=status_path)
            write_report(custom, pods["cart"], "istio-report-only", leaked=1)
            wait_status(kube, "istio-report-only", leakedNow=1, timeout=20)
            tried = [r for r in proxy.requests if r.method == "PATCH" and "/status" in r.path]
            assert sum(r.injected for r in tried) == 3 and tried[-1].status == 200

            # Every watch is cut; changes made meanwhile still arrive.
            assert proxy.drop_watches() > 0
            write_report(custom, pods["pay"], "istio-report-only", leaked=2)
            seed_pod(kube, "shop", "late", "node-a", **ISTIO_POD)
            wait_status(kube, "istio-report-only", leakedNow=3, matchedPods=5, timeout=20)

            # The re-list after a drop fails too (twice), then recovers.
            def report_lists() -> list[Any]:
                return [
                    r
                    for r in proxy.requests
                    if r.method == "GET"
                    and r.path.endswith(f"/{REPORT_PLURAL}")
                    and r.query.get("watch") != "true"
                ]

            lists_before = len(report_lists())
            proxy.fail(2, 500, method="GET", path_regex=rf"/{REPORT_PLURAL}\?(?!.*watch=true)")
            proxy.fail(1, 410, method="GET", path_regex=rf"/{REPORT_PLURAL}\?.*watch=true")
            proxy.drop_watches()
            write_report(custom, pods["ship"], "istio-report-only", leaked=4)
            wait_status(kube, "istio-report-only", leakedNow=7, timeout=20)
            assert len(report_lists()) - lists_before >= 3  # 2 failed, then the one that worked


def status_writers(kube: ControlPlane) -> Counter[str]:
    """Who patched policy statuses since the test began (the audit log's user)."""
    return Counter(
        r.user
        for r in kube.requests
        if r.method == "PATCH" and r.resource == f"{POLICY_PLURAL}/status"
    )


def test_two_replicas_one_leader(kube: ControlPlane, custom: Any) -> None:
    """Only the leader writes; the standby (here as the admin, to tell the two apart
    in the audit log) keeps its inventory warm and takes over when the leader leaves."""
    pods = seed_mesh(kube)
    with running_operator(kube, priority=10, kubeconfig=kube.kubeconfig) as standby:
        with running_operator(kube, priority=20) as leader:
            apply(kube, EXAMPLES / "istio-report-only.yaml")
            write_report(custom, pods["cart"], "istio-report-only", leaked=1)
            wait_status(kube, "istio-report-only", leakedNow=1)
            write_report(custom, pods["pay"], "istio-report-only", leaked=1)
            wait_status(kube, "istio-report-only", leakedNow=2)
            time.sleep(3 * DEBOUNCE)
            assert (sample(leader, "halfclose_operator_status_writes_total") or 0) >= 2
            assert not sample(standby, "halfclose_operator_status_writes_total")
            assert leader.reconciler and leader.reconciler.leading
            assert standby.reconciler and not standby.reconciler.leading
            # The standby keeps its inventory warm: it knows what the leader knows.
            assert len(standby.inventory.reports) == 2
            writers = status_writers(kube)
            assert set(writers) == {CHART_OPERATOR}, writers
        # The leader left (and said so in the peering object): the standby takes over.
        write_report(custom, pods["ship"], "istio-report-only", leaked=2)
        wait_status(kube, "istio-report-only", leakedNow=4, timeout=15)
        assert (sample(standby, "halfclose_operator_status_writes_total") or 0) >= 1
        assert standby.reconciler.leading
        assert status_writers(kube)[ADMIN] >= 1


def test_the_console_script(kube: ControlPlane) -> None:
    """``halfclose-operator`` as the chart runs it: env settings, probes, peering, SIGTERM."""
    seed_mesh(kube)
    metrics, liveness = free_port(), free_port()
    env = dict(
        os.environ,
        KUBECONFIG=kube.chart_kubeconfig("operator"),
        HALFCLOSE_OPERATOR_METRICS_PORT=str(metrics),
        HALFCLOSE_OPERATOR_LIVENESS_PORT=str(liveness),
        HALFCLOSE_OPERATOR_DEBOUNCE_SECONDS=str(DEBOUNCE),
        HALFCLOSE_OPERATOR_LOG_LEVEL="warning",
    )
    script = Path(sys.executable).with_name("halfclose-operator")
    proc = subprocess.Popen(
        [str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:

        def ready() -> bool:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                return http_get(metrics, "/readyz")[0] == 200
            except OSError:
                return False

        kube.wait_for(ready, timeout=20, what="/readyz")
        apply(kube, EXAMPLES / "linkerd.yaml")
        wait_condition(kube, "linkerd", "Ready", "False", "NoMatchingPods")
        assert http_get(liveness, "/healthz")[0] == 200
        peering = kube.get_object("kopf.dev", "v1", "clusterkopfpeerings", "halfclose")
        assert peering is not None and len(peering.get("status", {})) == 1  # this replica
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, output
        # A clean exit takes the replica out of the peering at once (a standby resumes).
        peering = kube.get_object("kopf.dev", "v1", "clusterkopfpeerings", "halfclose")
        assert peering is not None and not peering.get("status")
        assert "Traceback" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
