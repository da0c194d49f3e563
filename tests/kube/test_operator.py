"""The operator (kopf, in KopfRunner) against the HTTP API emulator.

Policies go in with kubectl, as a user applies them; reports with the Python
client, as the node agent writes them; pods and namespaces are seeded straight
into the emulator's store (the cluster the policies select from).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
from kopf.testing import KopfRunner
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
)
from halfclose.operator.handlers import OperatorState, build_operator
from halfclose.operator.settings import OperatorSettings
from support.kubeapi import KubeAPIEmulator

pytestmark = [pytest.mark.kube, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEBOUNCE = 0.3
T0 = "2025-06-01T12:00:00Z"


# ----------------------------------------------------------------------------- cluster


def seed_namespace(api: KubeAPIEmulator, name: str, **labels: str) -> None:
    api.put_object(
        "",
        "v1",
        "namespaces",
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        },
    )


def seed_pod(
    api: KubeAPIEmulator, namespace: str, name: str, node: str = "node-a", **labels: str
) -> dict[str, Any]:
    return api.put_object(
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


ISTIO_POD = {"security.istio.io/tlsMode": "istio"}


def seed_mesh(api: KubeAPIEmulator) -> dict[str, dict[str, Any]]:
    """shop (3 injected pods on 2 nodes + 1 plain pod), web (1 injected pod), kube-system."""
    seed_namespace(api, "shop", **{"istio-injection": "enabled"})
    seed_namespace(api, "web", **{"istio-injection": "enabled"})
    pods = {
        "cart": seed_pod(api, "shop", "cart", "node-a", **ISTIO_POD),
        "pay": seed_pod(api, "shop", "pay", "node-a", **ISTIO_POD),
        "ship": seed_pod(api, "shop", "ship", "node-b", **ISTIO_POD),
        "front": seed_pod(api, "web", "front", "node-b", **ISTIO_POD),
    }
    seed_pod(api, "shop", "plain", "node-a")
    return pods


def write_report(
    custom: Any, pod: dict[str, Any], policy: str, *, leaked: int, killed: int = 0, at_risk: int = 0
) -> None:
    """Create or update a pod's report, as the agent does (object, then /status)."""
    meta = pod["metadata"]
    status = build_report_status(
        ScanSummary(scanned_at=_now(), leaked=leaked, at_risk=at_risk, killed=killed),
        leaked_alert_threshold=10,
    )
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
            GROUP,
            VERSION,
            meta["namespace"],
            REPORT_PLURAL,
            meta["name"],
            {"spec": manifest["spec"]},
        )
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        meta["namespace"],
        REPORT_PLURAL,
        meta["name"],
        {"status": report_status_json(status)},
    )


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def apply(api: KubeAPIEmulator, manifest: dict[str, Any] | Path) -> None:
    if isinstance(manifest, Path):
        api.kubectl("apply", "-f", str(manifest))
    else:
        api.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def policy_manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "HalfClosePolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def policy(api: KubeAPIEmulator, name: str) -> dict[str, Any]:
    obj = api.get_object(GROUP, VERSION, POLICY_PLURAL, name)
    assert obj is not None, f"policy {name} is gone"
    return obj


def status_of(api: KubeAPIEmulator, name: str) -> dict[str, Any]:
    return dict(policy(api, name).get("status") or {})


def condition(api: KubeAPIEmulator, name: str, type_: str) -> tuple[str, str] | None:
    for cond in status_of(api, name).get("conditions", []):
        if cond["type"] == type_:
            return cond["status"], cond["reason"]
    return None


def wait_status(
    api: KubeAPIEmulator, name: str, timeout: float = 10.0, **expected: Any
) -> dict[str, Any]:
    """Wait until every ``expected`` status field (camelCase) has its value."""

    def done() -> bool:
        status = status_of(api, name)
        return all(status.get(k) == v for k, v in expected.items())

    try:
        api.wait_for(done, timeout=timeout)
    except AssertionError:
        raise AssertionError(
            f"{name}: status {status_of(api, name)} never had {expected}"
        ) from None
    return status_of(api, name)


def wait_condition(
    api: KubeAPIEmulator, name: str, type_: str, status: str, reason: str, *, timeout: float = 10.0
) -> None:
    try:
        api.wait_for(lambda: condition(api, name, type_) == (status, reason), timeout=timeout)
    except AssertionError:
        raise AssertionError(
            f"{name}: {type_} is {condition(api, name, type_)}, not {(status, reason)}"
        ) from None


# ----------------------------------------------------------------------------- operator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_operator(
    api: KubeAPIEmulator, *, priority: int = 100, liveness_port: int | None = None
) -> Iterator[OperatorState]:
    """The operator as ``halfclose-operator`` runs it (peering on), in KopfRunner."""
    settings = OperatorSettings(
        metrics_host="127.0.0.1",
        metrics_port=0,
        liveness_port=None,
        debounce_seconds=DEBOUNCE,
        peering="halfclose",
        priority=priority,
        kubeconfig=api.kubeconfig,
    )
    registry, state = build_operator(settings, metrics_registry=CollectorRegistry())
    args = ["run", "--all-namespaces", "--peering=halfclose", f"--priority={priority}"]
    if liveness_port:
        args.append(f"--liveness=http://127.0.0.1:{liveness_port}/healthz")
    with KopfRunner(
        args, registry=registry, settings=kopf.OperatorSettings(), timeout=30
    ) as runner:
        deadline = time.monotonic() + 10
        while not (state.probes and state.probes.ready):
            assert time.monotonic() < deadline, "the operator did not start"
            assert runner.future.done() is False, runner.future.result().output
            time.sleep(0.02)
        yield state
    assert runner.exit_code == 0, runner.output


def sample(state: OperatorState, name: str, **labels: str) -> float | None:
    return state.metrics.registry.get_sample_value(name, labels)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def custom(kube_api: KubeAPIEmulator) -> Any:
    return kubernetes.client.CustomObjectsApi(kube_api.client())


def status_patches(api: KubeAPIEmulator, name: str) -> int:
    path = f"/apis/{GROUP}/{VERSION}/{POLICY_PLURAL}/{name}/status"
    return sum(1 for r in api.requests if r.method == "PATCH" and r.path == path)


# ----------------------------------------------------------------------------- tests


def test_policy_status_aggregates_reports(kube_api: KubeAPIEmulator, custom: Any) -> None:
    pods = seed_mesh(kube_api)
    liveness = _free_port()
    with running_operator(kube_api, liveness_port=liveness) as state:
        apply(kube_api, EXAMPLES / "istio-kill.yaml")
        wait_condition(kube_api, "istio-kill", "Ready", "True", "Applied")
        status = wait_status(kube_api, "istio-kill", matchedPods=4, matchedNamespaces=2)
        assert (
            status["observedGeneration"] == policy(kube_api, "istio-kill")["metadata"]["generation"]
        )

        write_report(custom, pods["cart"], "istio-kill", leaked=3, killed=5)
        write_report(custom, pods["pay"], "istio-kill", leaked=0, at_risk=2)
        write_report(custom, pods["ship"], "istio-kill", leaked=7, killed=1)
        status = wait_status(
            kube_api,
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
        table = kube_api.kubectl("get", "hcp").stdout.splitlines()
        assert table[0].split() == [
            "NAME",
            "ACTION",
            "NAMESPACES",
            "PODS",
            "LEAKED",
            "KILLED",
            "READY",
            "AGE",
        ]
        assert table[1].split()[:7] == ["istio-kill", "KillSockets", "2", "4", "10", "6", "True"]
        reports = kube_api.kubectl("get", "hcr", "-A").stdout.splitlines()
        assert reports[0].split() == [
            "NAMESPACE",
            "NAME",
            "POD",
            "NODE",
            "LEAKED",
            "AT-RISK",
            "KILLED",
            "LAST-SCAN",
            "AGE",
        ]
        assert sorted(r.split()[1:7] for r in reports[1:]) == [
            ["cart", "cart", "node-a", "3", "0", "5"],
            ["pay", "pay", "node-a", "0", "2", "0"],
            ["ship", "ship", "node-b", "7", "0", "1"],
        ]

        # A report goes: the aggregate follows.
        custom.delete_namespaced_custom_object(GROUP, VERSION, "shop", REPORT_PLURAL, "ship")
        wait_status(kube_api, "istio-kill", leakedNow=3, killedTotal=5, nodesReporting=1)
        # A pod goes: its report goes with it (ownerReference) and the pod count drops.
        kube_api.delete_object("", "v1", "pods", "cart", "shop")
        wait_status(kube_api, "istio-kill", leakedNow=0, matchedPods=3, podsWithFindings=1)

        # Metrics, readiness, liveness, Events.
        assert sample(state, "halfclose_operator_policy_leaked_sockets", policy="istio-kill") == 0
        assert sample(state, "halfclose_operator_policy_killed_total", policy="istio-kill") == 0
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
    # (printed here: inside KopfRunner, stdout is the runner's)
    print("\n$ kubectl get hcp\n" + "\n".join(table))
    print("$ kubectl get hcr -A\n" + "\n".join(reports))
    events = [
        e
        for e in kube_api.objects("", "v1", "events", None)
        if e.get("involvedObject", {}).get("name") == "istio-kill"
    ]
    assert {(e["type"], e["reason"]) for e in events} >= {
        ("Normal", "Valid"),
        ("Normal", "Applied"),
    }


def test_status_writes_are_debounced(kube_api: KubeAPIEmulator, custom: Any) -> None:
    pods = seed_mesh(kube_api)
    with running_operator(kube_api) as state:
        apply(kube_api, EXAMPLES / "istio-report-only.yaml")
        wait_status(kube_api, "istio-report-only", matchedPods=4)
        before = status_patches(kube_api, "istio-report-only")
        started = time.monotonic()
        updates = 0
        for leaked in range(1, 61):
            for name in ("cart", "pay", "ship"):
                write_report(custom, pods[name], "istio-report-only", leaked=leaked)
                updates += 1
        wait_status(kube_api, "istio-report-only", leakedNow=180)
        elapsed = time.monotonic() - started
        writes = status_patches(kube_api, "istio-report-only") - before
    # At most one write per debounce interval (plus the one that catches up).
    assert 1 <= writes <= elapsed / DEBOUNCE + 2, (writes, elapsed)
    assert writes < updates / 10, (writes, updates)
    assert sample(state, "halfclose_operator_status_writes_total") == writes + before
    print(f"\n{updates} report updates in {elapsed:.1f}s -> {writes} policy status writes")


def test_policies_the_schema_rejects(kube_api: KubeAPIEmulator) -> None:
    cases = [
        (
            policy_manifest("a", namespaces=["shop"], conntrack={"strategy": "Sysctl"}),
            ["spec.conntrack", "conntrack settings apply only to action PatchConntrack"],
        ),
        (
            policy_manifest("b", namespaces=["shop"], thresholds={"minIdleSeconds": -1}),
            ["spec.thresholds.minIdleSeconds", "0"],
        ),
        (
            policy_manifest("c", namespaces=["shop"], action="Kill"),
            ["spec.action", "Kill", "KillSockets"],
        ),
        (
            policy_manifest("d", podSelector={"matchLabels": {"app": "web"}}),
            ["set namespaces, namespaceSelector or both"],
        ),
        (
            policy_manifest("e", namespaces=["shop"], capturePorts=[15001, 70000]),
            ["spec.capturePorts[1]", "65535"],
        ),
    ]
    for manifest, fragments in cases:
        proc = kube_api.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)
        assert proc.returncode != 0, manifest
        for fragment in fragments:
            assert fragment in proc.stderr, (fragment, proc.stderr)
        assert (
            kube_api.get_object(GROUP, VERSION, POLICY_PLURAL, manifest["metadata"]["name"]) is None
        )


def test_invalid_beyond_the_schema_and_selectors_matching_nothing(
    kube_api: KubeAPIEmulator,
) -> None:
    seed_mesh(kube_api)
    with running_operator(kube_api):
        # The API server takes it (a schema cannot check map keys); the operator does not.
        apply(
            kube_api,
            policy_manifest(
                "bad-key", namespaces=["shop"], podSelector={"matchLabels": {"bad key": "x"}}
            ),
        )
        apply(kube_api, policy_manifest("no-ns", namespaces=["nope"]))
        apply(
            kube_api,
            policy_manifest(
                "no-pods", namespaceSelector={}, podSelector={"matchLabels": {"app": "none"}}
            ),
        )
        wait_condition(kube_api, "bad-key", "Accepted", "False", "InvalidSpec")
        wait_condition(kube_api, "no-ns", "Ready", "False", "NoMatchingNamespaces")
        wait_condition(kube_api, "no-pods", "Ready", "False", "NoMatchingPods")
        accepted = next(
            c for c in status_of(kube_api, "bad-key")["conditions"] if c["type"] == "Accepted"
        )
        assert "label key 'bad key'" in accepted["message"]

        # Fixing the spec is picked up, with a new observedGeneration.
        apply(kube_api, policy_manifest("no-ns", namespaces=["web"]))
        wait_condition(kube_api, "no-ns", "Ready", "True", "Applied")
        assert status_of(kube_api, "no-ns")["observedGeneration"] == 2

        described = kube_api.kubectl("get", "hcp").stdout
        assert "bad-key" in described
    events = {
        (e["involvedObject"]["name"], e["type"], e["reason"])
        for e in kube_api.objects("", "v1", "events", None)
    }
    assert ("bad-key", "Warning", "InvalidSpec") in events
    assert ("no-ns", "Warning", "NoMatchingNamespaces") in events
    assert ("no-ns", "Normal", "Applied") in events


def test_overlapping_policies(kube_api: KubeAPIEmulator, custom: Any) -> None:
    pods = seed_mesh(kube_api)
    with running_operator(kube_api):
        apply(kube_api, policy_manifest("older", namespaces=["shop"], action="KillSockets"))
        wait_condition(kube_api, "older", "Ready", "True", "Applied")
        time.sleep(1.1)  # creationTimestamp has one-second resolution
        apply(kube_api, EXAMPLES / "istio-report-only.yaml")
        apply(kube_api, policy_manifest("shadowed", namespaces=["shop"]))

        wait_condition(kube_api, "istio-report-only", "Overlapping", "True", "OverlapLost")
        wait_status(kube_api, "istio-report-only", matchedPods=1)  # web/front only
        wait_condition(kube_api, "older", "Overlapping", "True", "OverlapWon")
        wait_condition(kube_api, "shadowed", "Ready", "False", "AllPodsClaimed")
        assert status_of(kube_api, "older")["matchedPods"] == 4  # incl. the plain pod

        # The agent's choice per pod is the same rule.
        policies = [
            parse_policy(policy(kube_api, n)) for n in ("older", "istio-report-only", "shadowed")
        ]
        from halfclose.api import select_policy

        winner = select_policy(policies, {"istio-injection": "enabled"}, "shop", ISTIO_POD)
        assert winner is not None and winner.name == "older"

        # The winner goes: its reports go too, and the next oldest takes the pods.
        write_report(custom, pods["cart"], "older", leaked=2)
        wait_status(kube_api, "older", leakedNow=2)
        kube_api.kubectl("delete", "hcp", "older")
        kube_api.wait_for(
            lambda: not kube_api.objects(GROUP, VERSION, REPORT_PLURAL, "shop"), timeout=10
        )
        wait_condition(kube_api, "istio-report-only", "Overlapping", "True", "OverlapWon")
        wait_status(kube_api, "istio-report-only", matchedPods=4)
        # shadowed keeps what istio-report-only does not select: the pod without a sidecar.
        wait_condition(kube_api, "shadowed", "Ready", "True", "Applied")
        wait_condition(kube_api, "shadowed", "Overlapping", "True", "OverlapLost")
        wait_status(kube_api, "shadowed", matchedPods=1)


def test_restart_converges_to_the_same_status(
    kube_api: KubeAPIEmulator,
    custom: Any,
) -> None:
    pods = seed_mesh(kube_api)
    with running_operator(kube_api):
        apply(kube_api, EXAMPLES / "istio-report-only.yaml")
        apply(kube_api, policy_manifest("quiet", namespaces=["web"]))
        write_report(custom, pods["cart"], "istio-report-only", leaked=4)
        wait_status(kube_api, "istio-report-only", leakedNow=4)
        # overlap: quiet is newer than istio-report-only for web/front
        wait_condition(kube_api, "quiet", "Ready", "False", "AllPodsClaimed")
    quiet_before = policy(kube_api, "quiet")

    # Changes while no operator runs.
    write_report(custom, pods["ship"], "istio-report-only", leaked=6, killed=2)
    custom.delete_namespaced_custom_object(GROUP, VERSION, "shop", REPORT_PLURAL, "cart")
    seed_pod(kube_api, "shop", "back", "node-c", **ISTIO_POD)

    with running_operator(kube_api) as state:
        status = wait_status(
            kube_api,
            "istio-report-only",
            leakedNow=6,
            killedTotal=2,
            matchedPods=5,
            nodesReporting=1,
        )
        time.sleep(4 * DEBOUNCE)  # several ticks: nothing more to write
        writes = sample(state, "halfclose_operator_status_writes_total")
    assert writes == 1, "exactly the changed policy's status, once"
    assert status_of(kube_api, "istio-report-only") == status
    quiet_after = policy(kube_api, "quiet")
    assert quiet_after["metadata"]["resourceVersion"] == quiet_before["metadata"]["resourceVersion"]


def test_api_errors_and_watch_drops_are_survived(
    kube_api: KubeAPIEmulator,
    custom: Any,
) -> None:
    pods = seed_mesh(kube_api)
    with running_operator(kube_api):
        apply(kube_api, EXAMPLES / "istio-report-only.yaml")
        wait_status(kube_api, "istio-report-only", matchedPods=4)

        # Status writes fail for a while.
        patches_before = status_patches(kube_api, "istio-report-only")
        kube_api.fail_next(
            3, status=500, method="PATCH", path_regex=r"/halfclosepolicies/.*/status"
        )
        write_report(custom, pods["cart"], "istio-report-only", leaked=1)
        wait_status(kube_api, "istio-report-only", leakedNow=1, timeout=20)
        assert status_patches(kube_api, "istio-report-only") - patches_before >= 4  # 3 failed

        # Every watch is cut; changes made meanwhile still arrive.
        assert kube_api.drop_watches() > 0
        write_report(custom, pods["pay"], "istio-report-only", leaked=2)
        seed_pod(kube_api, "shop", "late", "node-a", **ISTIO_POD)
        wait_status(kube_api, "istio-report-only", leakedNow=3, matchedPods=5, timeout=20)

        # The re-watch after a drop fails too (twice), then recovers.
        def report_lists() -> int:
            return sum(
                1
                for r in kube_api.requests
                if r.method == "GET" and r.path.endswith(f"/{REPORT_PLURAL}")
            )

        lists_before = report_lists()
        kube_api.fail_next(2, status=500, method="GET", path_regex=rf"/{REPORT_PLURAL}$")
        kube_api.drop_watches()
        write_report(custom, pods["ship"], "istio-report-only", leaked=4)
        wait_status(kube_api, "istio-report-only", leakedNow=7, timeout=20)
        assert report_lists() - lists_before >= 3  # 2 failed, then the one that worked


def test_two_replicas_one_leader(kube_api: KubeAPIEmulator, custom: Any) -> None:
    pods = seed_mesh(kube_api)
    with running_operator(kube_api, priority=10) as standby:
        with running_operator(kube_api, priority=20) as leader:
            apply(kube_api, EXAMPLES / "istio-report-only.yaml")
            write_report(custom, pods["cart"], "istio-report-only", leaked=1)
            wait_status(kube_api, "istio-report-only", leakedNow=1)
            time.sleep(3 * DEBOUNCE)
            assert (sample(leader, "halfclose_operator_status_writes_total") or 0) >= 1
            assert not sample(standby, "halfclose_operator_status_writes_total")
        # The leader left (and said so in the peering object): the standby takes over.
        write_report(custom, pods["pay"], "istio-report-only", leaked=2)
        wait_status(kube_api, "istio-report-only", leakedNow=3, timeout=15)
        assert (sample(standby, "halfclose_operator_status_writes_total") or 0) >= 1


def test_the_console_script(kube_api: KubeAPIEmulator) -> None:
    """``halfclose-operator`` as the chart runs it: env settings, probes, peering, SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    seed_mesh(kube_api)
    metrics, liveness = _free_port(), _free_port()
    env = dict(
        os.environ,
        KUBECONFIG=kube_api.kubeconfig,
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

        kube_api.wait_for(ready, timeout=20, interval=0.1)
        apply(kube_api, EXAMPLES / "linkerd.yaml")
        wait_condition(kube_api, "linkerd", "Ready", "False", "NoMatchingPods")
        assert http_get(liveness, "/healthz")[0] == 200
        peering = kube_api.get_object("kopf.dev", "v1", "clusterkopfpeerings", "halfclose")
        assert peering is not None and len(peering.get("status", {})) == 1  # this replica
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, output
        # A clean exit takes the replica out of the peering at once (a standby resumes).
        peering = kube_api.get_object("kopf.dev", "v1", "clusterkopfpeerings", "halfclose")
        assert peering is not None and not peering.get("status")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
