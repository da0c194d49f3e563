"""Conformance of the HTTP Kubernetes API emulator with its three real clients.

kubectl (the venv's v1.37 binary), the official ``kubernetes`` Python client and kopf
(``KopfRunner``) talk to a running emulator over loopback HTTP.  The CRDs are the
throwaway ``fixtures/widgets.yaml`` (shaped like HalfClosePolicy/HalfCloseReport);
one test loads the real ``crds/`` when they exist.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from kopf.testing import KopfRunner
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from support.kubeapi import KubeAPIEmulator
from support.kubeapi.discovery import SERVER_VERSION
from support.kubeapi.plugin import CRD_DIR
from support.kubeapi.resources import load_crd_files
from support.kubeapi.selectors import parse_label_selector

pytestmark = pytest.mark.kube

WIDGETS = Path(__file__).parent / "fixtures" / "widgets.yaml"
G, V = "kubeapi.test", "v1alpha1"


@pytest.fixture
def emu() -> Iterator[KubeAPIEmulator]:
    with KubeAPIEmulator(crd_paths=[WIDGETS], bookmark_interval=0.3) as emulator:
        yield emulator
        assert emulator.internal_errors == []


def policy(name: str, **spec: Any) -> str:
    return json.dumps(
        {"apiVersion": f"{G}/{V}", "kind": "WidgetPolicy", "metadata": {"name": name}, "spec": spec}
    )


def pod(name: str, namespace: str = "default", node: str = "", **labels: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "nginx"}]}
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    }


def report(
    name: str, pod_obj: dict[str, Any] | None = None, namespace: str = "default"
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if pod_obj is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod_obj["metadata"]["name"],
                "uid": pod_obj["metadata"]["uid"],
                "controller": True,
            }
        ]
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "WidgetReport",
        "metadata": meta,
        "spec": {"podName": pod_obj["metadata"]["name"] if pod_obj else name, "nodeName": "node-a"},
    }


def http(
    emu: KubeAPIEmulator,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    accept: str = "application/json",
) -> tuple[int, Any, Any]:
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    req = urllib.request.Request(
        emu.url + path,
        data=data,
        method=method,
        headers={
            "Content-Type": content_type,
            "Accept": accept,
            "Authorization": "Bearer anything",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


# ------------------------------------------------------------------ discovery


def test_discovery_serves_crds_core_kinds_and_kopf_peering(emu: KubeAPIEmulator) -> None:
    api = emu.client()
    groups = {g.name: g for g in k8s.ApisApi(api).get_api_versions().groups}
    assert {
        "kubeapi.test",
        "kopf.dev",
        "coordination.k8s.io",
        "events.k8s.io",
        "apiextensions.k8s.io",
    } <= set(groups)
    assert groups["kubeapi.test"].preferred_version.group_version == "kubeapi.test/v1alpha1"
    resources = {r.name: r for r in k8s.CustomObjectsApi(api).get_api_resources(G, V).resources}
    assert resources["widgetpolicies"].namespaced is False
    assert resources["widgetpolicies"].short_names == ["wp"]
    assert resources["widgetreports"].namespaced is True
    assert "widgetpolicies/status" in resources
    core = {r.name for r in k8s.CoreV1Api(api).get_api_resources().resources}
    assert {"namespaces", "pods", "pods/status", "events", "configmaps"} <= core
    version = k8s.VersionApi(api).get_code()
    assert version.major == "1" and int(version.minor) >= 30

    out = emu.kubectl("api-resources", "--api-group=kopf.dev").stdout
    assert "clusterkopfpeerings" in out and "kopfpeerings" in out
    crds = emu.kubectl("get", "crd", "-o", "name").stdout.split()
    assert "customresourcedefinition.apiextensions.k8s.io/widgetpolicies.kubeapi.test" in crds


def test_every_crd_in_the_repo_loads_with_its_rules_and_columns() -> None:
    """The real crds/ (when generated) must load: CEL compiles, printer columns parse."""
    files = sorted(CRD_DIR.glob("*.yaml"))
    if not files:
        pytest.skip("crds/ holds no CRDs yet")
    crds = load_crd_files(files)
    with KubeAPIEmulator(crd_paths=files) as emulator:
        served = emulator.kubectl("api-resources", "-o", "name").stdout.split()
        for crd in crds:
            assert crd["metadata"]["name"] in served  # plural.group, as kubectl names them
            rt = emulator.registry.get(
                crd["spec"]["group"],
                crd["spec"]["versions"][0]["name"],
                crd["spec"]["names"]["plural"],
            )
            assert rt is not None and rt.schema is not None


def test_kube_api_fixture_kubeconfig_serves_every_client(kube_api: KubeAPIEmulator) -> None:
    """The shared fixture: loopback URL, a kubeconfig the official loader accepts."""
    from kubernetes import config

    assert kube_api.url.startswith("http://127.0.0.1:")
    api = config.new_client_from_config(config_file=kube_api.kubeconfig)
    names = {ns.metadata.name for ns in k8s.CoreV1Api(api).list_namespace().items}
    assert {"default", "kube-system"} <= names
    assert "default" in kube_api.kubectl("get", "namespaces", "-o", "name").stdout
    ns = kube_api.get_object("", "v1", "namespaces", "default")
    assert ns is not None and ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "default"}
    # Bearer tokens are accepted whatever they say, and every request is logged.
    assert http(kube_api, "GET", "/api/v1/namespaces/default")[0] == 200
    assert ("GET", "/api/v1/namespaces", {}) in kube_api.requests


# ------------------------------------------------------------------ kubectl


def test_kubectl_apply_get_patch_delete_a_custom_resource(emu: KubeAPIEmulator) -> None:
    assert (
        "widgetpolicy.kubeapi.test/istio created"
        in emu.kubectl("apply", "-f", "-", input=policy("istio", namespaces=["shop", "web"])).stdout
    )
    table = emu.kubectl("get", "wp").stdout.splitlines()
    assert table[0].split() == ["NAME", "ACTION", "NAMESPACES", "LEAKED", "READY", "AGE"]
    assert table[1].split()[:4] == [
        "istio",
        "Report",
        "[shop",
        "web]",
    ]  # default applied, Go list format

    stored = json.loads(emu.kubectl("get", "wp", "istio", "-o", "json").stdout)
    assert stored["spec"]["thresholds"] == {"minIdleSeconds": 30}  # nested structural default
    meta = stored["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert "kubectl.kubernetes.io/last-applied-configuration" in meta["annotations"]

    emu.kubectl(
        "apply", "-f", "-", input=policy("istio", namespaces=["shop"], action="KillSockets")
    )
    emu.kubectl(
        "patch",
        "wp",
        "istio",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"leaked":3,"conditions":[{"type":"Ready","status":"True"}]}}',
    )
    row = emu.kubectl("get", "wp", "istio", "--no-headers").stdout.split()
    assert row[:5] == ["istio", "KillSockets", "[shop]", "3", "True"]
    after = emu.get_object(G, V, "widgetpolicies", "istio")
    assert (
        after is not None and after["metadata"]["generation"] == 2
    )  # spec changed once, status not counted
    assert int(after["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])

    yaml_out = emu.kubectl(
        "get", "widgets", "-o", "yaml"
    ).stdout  # the category resolves both kinds
    assert "kind: WidgetPolicy" in yaml_out and "action: KillSockets" in yaml_out
    assert (
        'widgetpolicy.kubeapi.test "istio" deleted' in emu.kubectl("delete", "wp", "istio").stdout
    )
    assert emu.get_object(G, V, "widgetpolicies", "istio") is None
    assert "NotFound" in emu.kubectl("get", "wp", "istio", check=False).stderr


def test_kubectl_all_namespaces_table_has_namespace_column(emu: KubeAPIEmulator) -> None:
    emu.kubectl("create", "namespace", "shop")
    owner = emu.put_object("", "v1", "pods", pod("web-1", "shop"))
    emu.client()  # a client next to kubectl must not disturb anything
    for r in (report("web-1", owner, "shop"), report("solo")):
        emu.kubectl("apply", "-f", "-", input=json.dumps(r))
    emu.kubectl(
        "patch",
        "wr",
        "web-1",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"leaked":5}}',
    )
    lines = emu.kubectl("get", "wr", "-A").stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "POD", "NODE", "LEAKED", "AGE"]
    rows = sorted(line.split() for line in lines[1:])
    assert rows[0][:4] == ["default", "solo", "solo", "node-a"]  # no LEAKED yet: an empty cell
    assert rows[1][:5] == ["shop", "web-1", "web-1", "node-a", "5"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"action": "Foo"},
            'spec.action: Unsupported value: "Foo": '
            'supported values: "Report", "KillSockets", "PatchConntrack"',
        ),
        (
            {"namespaces": ["a"], "namespaceSelector": {}},
            'spec: Invalid value: "object": '
            "namespaces and namespaceSelector are mutually exclusive",
        ),
        (
            {"action": "PatchConntrack"},
            "spec.closeWaitTimeoutSeconds: "
            "Required value: PatchConntrack needs closeWaitTimeoutSeconds",
        ),
        (
            {"capturePorts": [70000]},
            "spec.capturePorts[0]: Invalid value: 70000: "
            "spec.capturePorts[0] in body should be less than or equal to 65535",
        ),
        (
            {"capturePorts": [1, 2, 3, 4]},
            "spec.capturePorts: Too many: 4: must have at most 3 items",
        ),
        (
            {"thresholds": {"minIdleSeconds": "ten"}},
            'spec.thresholds.minIdleSeconds: Invalid value: "string": '
            'spec.thresholds.minIdleSeconds in body must be of type integer: "string"',
        ),
        (
            {"namespaces": ["Bad_NS"]},
            'spec.namespaces[0]: Invalid value: "Bad_NS": '
            "spec.namespaces[0] in body should match '^[a-z0-9-]+$'",
        ),
    ],
)
def test_kubectl_shows_validation_errors_as_a_user_sees_them(
    emu: KubeAPIEmulator, spec: dict[str, Any], expected: str
) -> None:
    proc = emu.kubectl("apply", "-f", "-", input=policy("bad", **spec), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f'The WidgetPolicy "bad" is invalid: {expected}'
    assert emu.objects(G, V, "widgetpolicies") == []


def test_kubectl_lists_every_error_and_rejects_unknown_fields(emu: KubeAPIEmulator) -> None:
    proc = emu.kubectl(
        "apply",
        "-f",
        "-",
        input=policy("bad", action="Foo", namespaces=["a"], namespaceSelector={}),
        check=False,
    )
    assert proc.stderr.splitlines()[1:] == [
        '* spec.action: Unsupported value: "Foo": '
        'supported values: "Report", "KillSockets", "PatchConntrack"',
        '* spec: Invalid value: "object": namespaces and namespaceSelector are mutually exclusive',
    ]
    strict = emu.kubectl("apply", "-f", "-", input=policy("p", bogus=1), check=False)
    assert 'strict decoding error: unknown field "spec.bogus"' in strict.stderr
    lenient = emu.kubectl("apply", "--validate=warn", "-f", "-", input=policy("p", bogus=1))
    assert 'Warning: unknown field "spec.bogus"' in lenient.stderr
    stored = emu.get_object(G, V, "widgetpolicies", "p")
    assert stored is not None and "bogus" not in stored["spec"]  # pruned like the real server


def test_kubectl_server_side_apply_creates_and_updates(emu: KubeAPIEmulator) -> None:
    assert (
        "serverside-applied"
        in emu.kubectl("apply", "--server-side", "-f", "-", input=policy("ssa")).stdout
    )
    emu.kubectl("apply", "--server-side", "-f", "-", input=policy("ssa", action="KillSockets"))
    stored = emu.get_object(G, V, "widgetpolicies", "ssa")
    assert stored is not None and stored["spec"]["action"] == "KillSockets"
    assert stored["metadata"]["generation"] == 2


def test_kubectl_pod_apply_patch_label_describe_delete(emu: KubeAPIEmulator) -> None:
    manifest = pod("web", node="node-a", app="web")
    manifest["spec"]["containers"].append({"name": "proxy", "image": "envoy:1"})
    emu.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    manifest["spec"]["containers"][1]["image"] = "envoy:2"
    assert (
        "pod/web configured" in emu.kubectl("apply", "-f", "-", input=json.dumps(manifest)).stdout
    )
    emu.kubectl(
        "patch", "pod", "web", "-p", '{"spec":{"containers":[{"name":"app","image":"nginx:2"}]}}'
    )
    emu.kubectl("label", "pod", "web", "tier=front")
    stored = emu.get_object("", "v1", "pods", "web", "default")
    assert stored is not None
    assert [(c["name"], c["image"]) for c in stored["spec"]["containers"]] == [
        ("app", "nginx:2"),
        ("proxy", "envoy:2"),
    ]
    assert stored["metadata"]["labels"] == {"app": "web", "tier": "front"}
    wide = emu.kubectl("get", "pods", "-o", "wide", "-l", "tier=front").stdout.splitlines()
    assert wide[0].split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert wide[1].split()[:3] == ["web", "0/2", "Pending"] and "node-a" in wide[1]
    assert "Containers:" in emu.kubectl("describe", "pod", "web").stdout
    missing = emu.kubectl(
        "apply", "-f", "-", input=json.dumps(pod("x", namespace="nope")), check=False
    )
    assert 'namespaces "nope" not found' in missing.stderr
    emu.kubectl("delete", "pod", "web")
    assert emu.objects("", "v1", "pods") == []


# ------------------------------------------------------------------ Python client


def test_client_crud_codes_and_status_bodies(emu: KubeAPIEmulator) -> None:
    core = k8s.CoreV1Api(emu.client())
    created = core.create_namespaced_pod("default", pod("a"))
    assert (
        created.metadata.uid
        and created.metadata.resource_version
        and created.status.phase == "Pending"
    )
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_pod("default", pod("a"))
    assert exists.value.status == 409 and json.loads(exists.value.body)["reason"] == "AlreadyExists"

    stale = core.read_namespaced_pod("a", "default")
    core.patch_namespaced_pod(
        "a", "default", {"metadata": {"labels": {"x": "1"}}}
    )  # strategic merge
    stale.metadata.labels = {"y": "2"}
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_pod("a", "default", stale)
    assert conflict.value.status == 409 and json.loads(conflict.value.body)["reason"] == "Conflict"

    fresh = core.read_namespaced_pod("a", "default")
    fresh.metadata.labels = {"y": "2"}
    replaced = core.replace_namespaced_pod("a", "default", fresh)
    assert replaced.metadata.labels == {"y": "2"}
    assert int(replaced.metadata.resource_version) > int(fresh.metadata.resource_version)

    status, body, _ = http(emu, "GET", "/api/v1/namespaces/default/pods/nope")
    assert status == 404
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "nope" not found',
        "reason": "NotFound",
        "code": 404,
        "details": {"name": "nope", "kind": "pods"},
    }
    core.create_namespaced_pod("default", pod("dry"), dry_run="All")
    assert emu.get_object("", "v1", "pods", "dry", "default") is None
    deleted = core.delete_namespaced_pod("a", "default")
    assert deleted.metadata.name == "a"  # pods answer DELETE with the object
    custom = k8s.CustomObjectsApi(emu.client())
    custom.create_cluster_custom_object(G, V, "widgetpolicies", json.loads(policy("p")))
    gone = custom.delete_cluster_custom_object(G, V, "widgetpolicies", "p")
    assert (
        gone["kind"] == "Status" and gone["status"] == "Success"
    )  # custom resources with a Status


def test_client_list_with_label_and_field_selectors(emu: KubeAPIEmulator) -> None:
    core = k8s.CoreV1Api(emu.client())
    core.create_namespace({"metadata": {"name": "shop"}})
    core.create_namespaced_pod("default", pod("a1", node="node-a", app="web", tier="front"))
    core.create_namespaced_pod("default", pod("a2", node="node-a", app="db"))
    core.create_namespaced_pod("shop", pod("b1", "shop", node="node-b", app="web"))
    core.create_namespaced_pod("shop", pod("u1", "shop"))  # unscheduled
    core.patch_namespaced_pod_status("a1", "default", {"status": {"phase": "Running"}})

    def names(**kw: Any) -> list[str]:
        return sorted(p.metadata.name for p in core.list_pod_for_all_namespaces(**kw).items)

    assert names(field_selector="spec.nodeName=node-a") == ["a1", "a2"]
    assert names(field_selector="spec.nodeName=") == ["u1"]
    assert names(field_selector="spec.nodeName!=node-a,metadata.namespace=shop") == ["b1", "u1"]
    assert names(field_selector="status.phase=Running") == ["a1"]
    assert names(field_selector="metadata.name=b1") == ["b1"]
    assert names(label_selector="app=web") == ["a1", "b1"]
    assert names(label_selector="app!=web") == ["a2", "u1"]
    assert names(label_selector="app in (web,db),tier notin (front)") == ["a2", "b1"]
    assert names(label_selector="tier") == ["a1"]
    assert names(label_selector="!app") == ["u1"]
    assert names(label_selector="app=web", field_selector="spec.nodeName=node-a") == ["a1"]
    assert [p.metadata.name for p in core.list_namespaced_pod("shop").items] == ["b1", "u1"]

    status, body, _ = http(emu, "GET", "/api/v1/pods?limit=3")
    assert body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert int(body["metadata"]["resourceVersion"]) >= 5 and len(body["items"]) == 3
    status, rest, _ = http(
        emu, "GET", f"/api/v1/pods?limit=3&continue={body['metadata']['continue']}"
    )
    assert [i["metadata"]["name"] for i in body["items"] + rest["items"]] == [
        "a1",
        "a2",
        "b1",
        "u1",
    ]
    status, bad, _ = http(emu, "GET", "/api/v1/pods?fieldSelector=spec.image%3Dx")
    assert status == 400 and bad["message"] == "field label not supported: spec.image"
    assert ("GET", "/api/v1/pods", {"fieldSelector": "spec.nodeName=node-a"}) in emu.requests


def test_describe_shows_events_selected_by_involved_object(emu: KubeAPIEmulator) -> None:
    core = k8s.CoreV1Api(emu.client())
    target = core.create_namespaced_pod("default", pod("ev")).metadata
    for reason, name, uid in (("Leaked", "ev", target.uid), ("Other", "someone-else", "x")):
        core.create_namespaced_event(
            "default",
            {
                "metadata": {"generateName": "ev-"},
                "involvedObject": {"kind": "Pod", "name": name, "namespace": "default", "uid": uid},
                "reason": reason,
                "message": f"{reason} happened",
                "type": "Warning",
                "source": {"component": "halfclose-agent"},
            },
        )
    events = core.list_namespaced_event("default", field_selector="involvedObject.name=ev")
    assert [e.reason for e in events.items] == ["Leaked"]
    assert events.items[0].metadata.name.startswith("ev-")  # generateName
    by_source = core.list_namespaced_event("default", field_selector="source=halfclose-agent")
    assert len(by_source.items) == 2
    described = emu.kubectl("describe", "pod", "ev").stdout
    assert "Leaked happened" in described and "Other happened" not in described


def test_label_selector_grammar() -> None:
    sel = parse_label_selector("a=1,b!=2,c in (x, y),d notin (z),e,!f,g>3")
    assert sel.matches({"a": "1", "c": "y", "e": "", "g": "4"})
    assert not sel.matches({"a": "1", "c": "y", "e": "", "g": "4", "f": "x"})
    assert not sel.matches({"a": "1", "b": "2", "c": "y", "e": "", "g": "4"})
    assert not sel.matches({"a": "1", "c": "y", "e": "", "g": "3"})


def test_client_watch_streams_events_and_honours_timeout(emu: KubeAPIEmulator) -> None:
    core = k8s.CoreV1Api(emu.client())
    core.create_namespaced_pod("default", pod("w1", app="web"))

    def writer() -> None:
        time.sleep(0.2)
        core.patch_namespaced_pod("w1", "default", {"metadata": {"labels": {"v": "2"}}})
        core.create_namespaced_pod("default", pod("w2", app="web"))
        core.delete_namespaced_pod("w2", "default")

    thread = threading.Thread(target=writer)
    started = time.monotonic()
    thread.start()
    events = [
        (e["type"], e["object"].metadata.name)
        for e in k8s_watch.Watch().stream(
            core.list_namespaced_pod, "default", label_selector="app=web", timeout_seconds=1
        )
    ]
    elapsed = time.monotonic() - started
    thread.join()
    assert events == [("ADDED", "w1"), ("MODIFIED", "w1"), ("ADDED", "w2"), ("DELETED", "w2")]
    assert 0.9 < elapsed < 3

    # Resume from a resourceVersion: only what happened after it.
    rv = core.list_namespaced_pod("default").metadata.resource_version
    core.patch_namespaced_pod(
        "w1", "default", {"metadata": {"labels": {"app": "db"}}}
    )  # leaves the selection
    resumed = [
        (e["type"], e["object"].metadata.name)
        for e in k8s_watch.Watch().stream(
            core.list_namespaced_pod,
            "default",
            label_selector="app=web",
            resource_version=rv,
            timeout_seconds=1,
        )
    ]
    assert resumed == [("DELETED", "w1")]


def test_watch_wire_format_bookmarks_and_gone() -> None:
    with KubeAPIEmulator(bookmark_interval=0.2, history_limit=3) as emu:
        emu.put_object("", "v1", "configmaps", {"metadata": {"name": "c0", "namespace": "default"}})
        req = urllib.request.Request(
            f"{emu.url}/api/v1/namespaces/default/configmaps?watch=true&allowWatchBookmarks=true&timeoutSeconds=1"
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.headers["Transfer-Encoding"] == "chunked"
            lines = [json.loads(line) for line in resp]
        types = [e["type"] for e in lines]
        assert types[0] == "ADDED" and "BOOKMARK" in types
        bookmark = next(e for e in lines if e["type"] == "BOOKMARK")["object"]
        assert bookmark["kind"] == "ConfigMap" and bookmark["metadata"]["resourceVersion"]

        initial = f"{emu.url}/api/v1/configmaps?watch=true&sendInitialEvents=true"
        initial += "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"
        with urllib.request.urlopen(initial, timeout=5) as resp:
            streamed = [json.loads(line) for line in resp]
        assert streamed[0]["type"] == "ADDED"
        end = streamed[1]["object"]["metadata"]
        assert streamed[1]["type"] == "BOOKMARK"
        assert end["annotations"] == {"k8s.io/initial-events-end": "true"}

        for i in range(5):  # push the history past its limit of 3 events
            emu.put_object(
                "", "v1", "configmaps", {"metadata": {"name": f"c{i + 1}", "namespace": "default"}}
            )
        with urllib.request.urlopen(
            f"{emu.url}/api/v1/configmaps?watch=true&resourceVersion=1", timeout=5
        ) as resp:
            gone = [json.loads(line) for line in resp]
        assert gone[0]["type"] == "ERROR" and gone[0]["object"]["code"] == 410


# ------------------------------------------------------------------ object semantics


def test_generation_status_subresource_and_noop_writes(emu: KubeAPIEmulator) -> None:
    custom = k8s.CustomObjectsApi(emu.client())
    body = json.loads(policy("g"))
    body["status"] = {"leaked": 99}
    created = custom.create_cluster_custom_object(G, V, "widgetpolicies", body)
    assert (
        created["metadata"]["generation"] == 1 and "status" not in created
    )  # status dropped on create

    st = custom.patch_cluster_custom_object_status(
        G, V, "widgetpolicies", "g", {"spec": {"action": "KillSockets"}, "status": {"leaked": 1}}
    )
    assert (
        st["status"] == {"leaked": 1} and st["spec"]["action"] == "Report"
    )  # /status never touches spec
    assert st["metadata"]["generation"] == 1

    main = custom.patch_cluster_custom_object(
        G, V, "widgetpolicies", "g", {"spec": {"action": "KillSockets"}, "status": {"leaked": 5}}
    )
    assert (
        main["status"] == {"leaked": 1} and main["metadata"]["generation"] == 2
    )  # main never touches status

    labelled = custom.patch_cluster_custom_object(
        G, V, "widgetpolicies", "g", {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled["metadata"]["generation"] == 2  # metadata is not spec
    again = custom.patch_cluster_custom_object(
        G, V, "widgetpolicies", "g", {"spec": {"action": "KillSockets"}}
    )
    assert (
        again["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]
    )  # a no-op write

    # observedGeneration is the operator's to write, through /status, without bumping generation.
    observed = custom.patch_cluster_custom_object_status(
        G,
        V,
        "widgetpolicies",
        "g",
        {"status": {"observedGeneration": again["metadata"]["generation"]}},
    )
    assert observed["status"]["observedGeneration"] == observed["metadata"]["generation"] == 2

    status, _, _ = http(
        emu,
        "PATCH",
        f"/apis/{G}/{V}/widgetpolicies/g",
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
            {"op": "replace", "path": "/spec/action", "value": "Report"},
        ],
        content_type="application/json-patch+json",
    )
    assert status == 422  # a failed JSON-patch test is what kopf's optimistic concurrency expects
    status, _, _ = http(
        emu,
        "PATCH",
        f"/apis/{G}/{V}/widgetpolicies/g",
        {"spec": {}},
        content_type="application/strategic-merge-patch+json",
    )
    assert status == 415  # custom resources do not take strategic merge patches
    reports = k8s.CustomObjectsApi(emu.client())
    reports.create_namespaced_custom_object(G, V, "default", "widgetreports", report("r"))
    with pytest.raises(ApiException) as immutable:
        reports.patch_namespaced_custom_object(
            G, V, "default", "widgetreports", "r", {"spec": {"podName": "other"}}
        )
    assert immutable.value.status == 422
    assert json.loads(immutable.value.body)["message"] == (
        'WidgetReport.kubeapi.test "r" is invalid: '
        'spec.podName: Invalid value: "string": podName is immutable'
    )


def test_finalizers_hold_deletion_until_removed(emu: KubeAPIEmulator) -> None:
    custom = k8s.CustomObjectsApi(emu.client())
    body = json.loads(policy("f"))
    body["metadata"]["finalizers"] = ["kubeapi.test/cleanup"]
    custom.create_cluster_custom_object(G, V, "widgetpolicies", body)
    status, marked, _ = http(emu, "DELETE", f"/apis/{G}/{V}/widgetpolicies/f")
    assert status == 202 and marked["metadata"]["deletionTimestamp"]
    assert (
        marked["metadata"]["generation"] == 2
    )  # starting deletion bumps a custom resource's generation
    with pytest.raises(ApiException) as refused:
        custom.patch_cluster_custom_object(
            G,
            V,
            "widgetpolicies",
            "f",
            {"metadata": {"finalizers": ["kubeapi.test/cleanup", "x/new"]}},
        )
    assert (
        "no new finalizers can be added if the object is being deleted"
        in json.loads(refused.value.body)["message"]
    )
    assert emu.get_object(G, V, "widgetpolicies", "f") is not None
    custom.patch_cluster_custom_object(
        G, V, "widgetpolicies", "f", {"metadata": {"finalizers": None}}
    )
    assert emu.get_object(G, V, "widgetpolicies", "f") is None


def test_owner_references_are_garbage_collected(emu: KubeAPIEmulator) -> None:
    core = k8s.CoreV1Api(emu.client())
    custom = k8s.CustomObjectsApi(emu.client())
    owner = core.create_namespaced_pod("default", pod("owner")).to_dict()
    for name in ("r1", "r2"):
        custom.create_namespaced_custom_object(
            G, V, "default", "widgetreports", report(name, owner)
        )
    held = report("r3", owner)
    held["metadata"]["finalizers"] = ["kubeapi.test/keep"]
    custom.create_namespaced_custom_object(G, V, "default", "widgetreports", held)
    custom.create_namespaced_custom_object(G, V, "default", "widgetreports", report("unowned"))

    core.delete_namespaced_pod("owner", "default")
    left = {o["metadata"]["name"]: o for o in emu.objects(G, V, "widgetreports", "default")}
    assert set(left) == {"r3", "unowned"}
    assert left["r3"]["metadata"]["deletionTimestamp"]  # collected, but held by its finalizer

    orphan_owner = core.create_namespaced_pod("default", pod("owner2")).to_dict()
    custom.create_namespaced_custom_object(
        G, V, "default", "widgetreports", report("kept", orphan_owner)
    )
    core.delete_namespaced_pod("owner2", "default", propagation_policy="Orphan")
    kept = emu.get_object(G, V, "widgetreports", "kept", "default")
    assert kept is not None and "ownerReferences" not in kept["metadata"]

    fg_owner = core.create_namespaced_pod("default", pod("owner3")).to_dict()
    blocker = report("blocker", fg_owner)
    blocker["metadata"]["finalizers"] = ["kubeapi.test/keep"]
    custom.create_namespaced_custom_object(G, V, "default", "widgetreports", blocker)
    core.delete_namespaced_pod("owner3", "default", propagation_policy="Foreground")
    waiting = emu.get_object("", "v1", "pods", "owner3", "default")
    assert waiting is not None and waiting["metadata"]["finalizers"] == ["foregroundDeletion"]
    custom.patch_namespaced_custom_object(
        G, V, "default", "widgetreports", "blocker", {"metadata": {"finalizers": None}}
    )
    assert emu.get_object("", "v1", "pods", "owner3", "default") is None  # dependents gone first

    core.create_namespace({"metadata": {"name": "doomed"}})
    core.create_namespaced_config_map("doomed", {"metadata": {"name": "c"}})
    core.delete_namespace("doomed")
    assert emu.get_object("", "v1", "namespaces", "doomed") is None
    assert emu.objects("", "v1", "configmaps", "doomed") == []


def test_fail_next_and_kmock_reactions(emu: KubeAPIEmulator) -> None:
    core = k8s.CoreV1Api(emu.client())
    emu.fail_next(2, 503, method="GET", path_regex=r"/pods$")
    for _ in range(2):
        with pytest.raises(ApiException) as failed:
            core.list_namespaced_pod("default")
        assert failed.value.status == 503
        assert json.loads(failed.value.body)["reason"] == "ServiceUnavailable"
    assert core.list_namespaced_pod("default").items == []
    core.list_namespace()  # other paths were never affected

    assert emu.kmock is not None
    emu.kmock["get /version/"] << {
        **SERVER_VERSION,
        "minor": "99",
    }  # the KMock DSL still works in front
    assert k8s.VersionApi(emu.client()).get_code().minor == "99"


# ------------------------------------------------------------------ kopf


def _operator(emu: KubeAPIEmulator, log: list[str]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return emu.connection_info()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.networking.error_backoffs = [0.05, 0.1, 0.2, 0.4]
        settings.watching.server_timeout = 10
        settings.persistence.finalizer = "kubeapi.test/kopf-finalizer"

    @kopf.on.create(G, V, "widgetpolicies", registry=registry)
    def created(name: str, patch: kopf.Patch, meta: kopf.Meta, **_: Any) -> None:
        log.append(f"create {name}")
        patch.status["observedGeneration"] = meta["generation"]
        patch.status["leaked"] = 7

    @kopf.on.delete(G, V, "widgetpolicies", registry=registry)
    def deleted(name: str, **_: Any) -> None:
        log.append(f"delete {name}")

    return registry


def _status(emu: KubeAPIEmulator, name: str) -> dict[str, Any]:
    obj = emu.get_object(G, V, "widgetpolicies", name)
    return (obj or {}).get("status") or {}


def test_kopf_operator_handles_create_status_finalizer_and_peering(emu: KubeAPIEmulator) -> None:
    log: list[str] = []
    emu.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "kopf.dev/v1",
                "kind": "ClusterKopfPeering",
                "metadata": {"name": "default"},
            }
        ),
    )
    with KopfRunner(
        ["run", "-A", "--peering=default"], registry=_operator(emu, log), timeout=30
    ) as runner:
        emu.kubectl("apply", "-f", "-", input=policy("k1"))
        emu.wait_for(lambda: _status(emu, "k1").get("leaked") == 7)
        obj = emu.get_object(G, V, "widgetpolicies", "k1")
        assert obj is not None and "kubeapi.test/kopf-finalizer" in obj["metadata"]["finalizers"]
        assert _status(emu, "k1")["observedGeneration"] == 1
        peering = emu.get_object("kopf.dev", "v1", "clusterkopfpeerings", "default")
        assert peering is not None and peering.get("status")  # kopf announced itself there
        emu.kubectl("delete", "wp", "k1", "--wait=false")
        emu.wait_for(lambda: emu.get_object(G, V, "widgetpolicies", "k1") is None)
    assert runner.exit_code == 0 and runner.exception is None
    assert log == ["create k1", "delete k1"]


def test_kopf_converges_through_api_errors_and_dropped_watches(emu: KubeAPIEmulator) -> None:
    log: list[str] = []
    with KopfRunner(
        ["run", "-A", "--standalone"], registry=_operator(emu, log), timeout=30
    ) as runner:
        emu.wait_for(lambda: emu.open_watches >= 1)
        emu.fail_next(3, 500, method="PATCH")
        emu.kubectl("apply", "-f", "-", input=policy("e1"))
        emu.wait_for(lambda: _status(emu, "e1").get("leaked") == 7)

        watches_before = sum(1 for r in emu.requests if r.query.get("watch") == "true")
        assert emu.drop_watches() >= 1
        emu.kubectl("apply", "-f", "-", input=policy("e2"))
        emu.wait_for(lambda: _status(emu, "e2").get("leaked") == 7)
        assert sum(1 for r in emu.requests if r.query.get("watch") == "true") > watches_before
    assert runner.exit_code == 0
    assert sorted(log) == ["create e1", "create e2"]
    patches = [r for r in emu.requests if r.method == "PATCH"]
    assert len(patches) >= 4  # three injected failures, then the retry that went through
    retried = [
        line for line in runner.output.splitlines() if "injected failure (fail_next)" in line
    ]
    assert len(retried) == 3  # kopf saw each injected 500 and retried
