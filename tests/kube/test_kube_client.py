"""The agent's own API client (``halfclose.agent.kube.client``) against the real API server.

It replaced the ``kubernetes`` package (issue 11: 46 MiB of RSS to import), so what
that package did for the agent is checked here on the wire: list, watch (events
arrive, a watch the server ends ends, an expired resourceVersion is a 410), a create
conflict (409), no answer (status 0), keep-alive reuse, kubeconfig credentials
(files and inline data) and the in-cluster service account whose token file the
kubelet rotates.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from halfclose.agent.kube.client import ApiError, RawClient, load_api_client
from halfclose.agent.kube.config import ConfigError, in_cluster
from support.controlplane import ControlPlane

pytestmark = pytest.mark.kube

NAMESPACE = "hcc-client"
CONFIGMAPS = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
WHOAMI = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


def _configmap(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {"k": "v"},
    }


def _whoami(client: RawClient) -> str:
    review = client.request(
        "POST", WHOAMI, body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    )
    return str(review["status"]["userInfo"]["username"])


@pytest.fixture
def admin(kube: ControlPlane) -> Iterator[RawClient]:
    kube.ensure_namespace(NAMESPACE)
    client = RawClient(load_api_client(kube.kubeconfig), 10.0)
    yield client
    client.close()


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed): connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_list_create_conflict_and_watch_events(kube: ControlPlane, admin: RawClient) -> None:
    kube.put_object("", "v1", "configmaps", _configmap("hcc-zero"))
    listed = admin.get(CONFIGMAPS)
    rv = listed["metadata"]["resourceVersion"]
    assert "hcc-zero" in {c["metadata"]["name"] for c in listed["items"]}
    handle, events = admin.watch(CONFIGMAPS, {"resourceVersion": rv}, read_timeout=30)
    try:
        created = admin.request("POST", CONFIGMAPS, body=_configmap("hcc-one"))
        assert created["metadata"]["name"] == "hcc-one"
        with pytest.raises(ApiError) as err:
            admin.request("POST", CONFIGMAPS, body=_configmap("hcc-one"))
        assert err.value.status == 409 and not err.value.unreachable
        assert "already exists" in str(err.value)
        admin.request(
            "PATCH",
            f"{CONFIGMAPS}/hcc-one",
            body={"data": {"k": "w"}},
            content_type="application/merge-patch+json",
        )
        admin.request("DELETE", f"{CONFIGMAPS}/hcc-one")
        seen = [(e["type"], e["object"]["metadata"]["name"]) for e in _take(events, 3)]
        assert seen == [("ADDED", "hcc-one"), ("MODIFIED", "hcc-one"), ("DELETED", "hcc-one")]
    finally:
        handle.shutdown()
    with pytest.raises(ApiError) as err:
        admin.get(f"{CONFIGMAPS}/hcc-one")
    assert err.value.status == 404


def _take(events: Iterator[dict[str, object]], n: int) -> list[dict]:  # type: ignore[type-arg]
    return [next(events) for _ in range(n)]


def test_a_watch_the_server_ends_ends(kube: ControlPlane, admin: RawClient) -> None:
    kube.put_object("", "v1", "configmaps", _configmap("hcc-zero"))
    started = time.monotonic()
    _handle, events = admin.watch(CONFIGMAPS, {"timeoutSeconds": "1"}, read_timeout=30)
    initial = list(events)  # the server's timeout ends the chunked stream: no error
    assert {e["type"] for e in initial} == {"ADDED"}
    assert time.monotonic() - started < 10


def test_shutdown_wakes_a_blocked_watch(admin: RawClient) -> None:
    rv = admin.get(CONFIGMAPS)["metadata"]["resourceVersion"]
    handle, events = admin.watch(CONFIGMAPS, {"resourceVersion": rv}, read_timeout=60)
    outcome: list[object] = []

    def follow() -> None:
        try:
            outcome.append(list(events))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(0.3)  # blocked in the read: nothing happens in the namespace
    assert thread.is_alive()
    handle.shutdown()
    thread.join(5)
    assert not thread.is_alive() and outcome


def _compact_etcd(kube: ControlPlane, revision: str) -> None:
    """What the API server does every 5 minutes (``--etcd-compaction-interval``), now:
    etcd forgets every revision before ``revision``."""
    (url,) = (a.split("=", 1)[1] for a in kube.processes["etcd"].argv if "listen-client" in a)
    body = json.dumps({"revision": revision, "physical": True}).encode()
    req = urllib.request.Request(f"{url}/v3/kv/compaction", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as rsp:
        assert rsp.status == 200


def test_an_expired_resource_version_is_410(kube: ControlPlane, admin: RawClient) -> None:
    """Events are read from etcd itself (no watch cache), so a compaction expires their
    old resourceVersions at once: a list at one is an HTTP 410 (``ApiError(410)``), a
    watch from one a 410 ERROR event; the reflector re-lists on both."""
    events = f"/api/v1/namespaces/{NAMESPACE}/events"
    event = {
        "metadata": {"name": "hcc-event"},
        "involvedObject": {"namespace": NAMESPACE, "name": "hcc"},
        "reason": "Test",
        "message": "m",
        "type": "Normal",
    }
    old = admin.request("POST", events, body=event)["metadata"]["resourceVersion"]
    admin.request("DELETE", f"{events}/hcc-event")
    later = admin.request("POST", events, body={**event, "metadata": {"name": "hcc-later"}})
    _compact_etcd(kube, later["metadata"]["resourceVersion"])
    with pytest.raises(ApiError) as err:
        admin.get(events, {"resourceVersion": old, "resourceVersionMatch": "Exact"})
    assert err.value.status == 410 and not err.value.unreachable
    _handle, stream = admin.watch(events, {"resourceVersion": old}, read_timeout=30)
    first = next(stream)
    assert first["type"] == "ERROR" and first["object"]["code"] == 410, first["object"]["message"]


def test_no_answer_is_status_0(kube: ControlPlane) -> None:
    port = _closed_port()
    ca = kube.certs.ca
    config = in_cluster(
        {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)},
        str(_service_account_dir(kube.workdir / "hcc-refused", ca, "not-a-token")),
    )
    client = RawClient(config, 2.0)
    started = time.monotonic()
    with pytest.raises(ApiError) as err:
        client.get("/api/v1/namespaces")
    assert err.value.status == 0 and err.value.unreachable
    assert "ConnectError" in str(err.value)
    with pytest.raises(ApiError) as err:
        client.watch("/api/v1/namespaces", {}, read_timeout=5)
    assert err.value.status == 0
    assert time.monotonic() - started < 5


def test_keep_alive_reuses_one_connection(kube: ControlPlane, admin: RawClient) -> None:
    for _ in range(5):
        admin.get(CONFIGMAPS)
    assert admin.connections_opened == 1
    # An idle connection the server dropped (here: the server restarted) is
    # noticed and replaced; the request does not fail.
    kube.restart_apiserver()
    assert admin.get(CONFIGMAPS)["kind"] == "ConfigMapList"
    assert admin.connections_opened == 2


def _service_account_dir(folder: Path, ca: Path, token: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca, folder / "ca.crt")
    _rotate(folder, token)
    return folder


def _rotate(folder: Path, token: str) -> None:
    """As the kubelet writes a projected token: a new file, swapped in by rename."""
    tmp = folder / ".token.tmp"
    tmp.write_text(token)
    os.replace(tmp, folder / "token")


def test_in_cluster_token_file_is_re_read_when_rotated(kube: ControlPlane) -> None:
    kube.ensure_namespace(NAMESPACE)
    for sa in ("hcc-first", "hcc-second"):
        kube.put_object(
            "",
            "v1",
            "serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": sa, "namespace": NAMESPACE}},
        )  # fmt: skip
    first = kube.token_for("hcc-first", NAMESPACE, expiration_seconds=600)
    second = kube.token_for("hcc-second", NAMESPACE, expiration_seconds=600)
    folder = _service_account_dir(kube.workdir / "hcc-sa", kube.certs.ca, first)
    host, port = kube.url.removeprefix("https://").rsplit(":", 1)
    config = in_cluster(
        {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}, str(folder)
    )
    client = RawClient(config, 10.0)
    assert _whoami(client) == f"system:serviceaccount:{NAMESPACE}:hcc-first"
    _rotate(folder, second)
    assert _whoami(client) == f"system:serviceaccount:{NAMESPACE}:hcc-second"
    _rotate(folder, "expired.or.revoked")  # what an expired bound token gets: 401
    with pytest.raises(ApiError) as err:
        _whoami(client)
    assert err.value.status == 401 and not err.value.unreachable
    _rotate(folder, first)  # the kubelet's next rotation: the same client recovers
    assert _whoami(client) == f"system:serviceaccount:{NAMESPACE}:hcc-first"


def test_kubeconfig_with_inline_certificates(kube: ControlPlane, tmp_path: Path) -> None:
    """``*-data`` fields (what kind and most installers write) instead of file paths."""
    doc = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cluster, user = doc["clusters"][0]["cluster"], doc["users"][0]["user"]

    def inline(path: str) -> str:
        return base64.b64encode(Path(path).read_bytes()).decode()

    cluster["certificate-authority-data"] = inline(cluster.pop("certificate-authority"))
    user["client-certificate-data"] = inline(user.pop("client-certificate"))
    user["client-key-data"] = inline(user.pop("client-key"))
    path = tmp_path / "inline.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    client = RawClient(load_api_client(str(path)))
    assert _whoami(client) == "halfclose-test-admin"  # the client certificate's CN
    assert "kube-system" in {
        n["metadata"]["name"] for n in client.get("/api/v1/namespaces")["items"]
    }


def test_unusable_configurations_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        load_api_client(None, environ={})
    with pytest.raises(ConfigError, match="cannot read kubeconfig"):
        load_api_client(str(tmp_path / "missing"))
    path = tmp_path / "exec.kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}],
            }
        )
    )
    with pytest.raises(ConfigError, match="'exec': not supported"):
        load_api_client(str(path))


def _relative_kubeconfig(kube: ControlPlane, folder: Path, **cluster_extra: object) -> Path:
    """The admin kubeconfig with its files copied beside it, named by relative paths
    (kubectl reads them relative to the kubeconfig's folder, not the working directory)."""
    doc = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cluster, user = doc["clusters"][0]["cluster"], doc["users"][0]["user"]
    for body, key in ((cluster, "certificate-authority"), (user, "client-certificate"),
                      (user, "client-key")):  # fmt: skip
        shutil.copy(body[key], folder / f"{key}.pem")
        body[key] = f"{key}.pem"
    cluster.update(cluster_extra)
    path = folder / "relative.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kubeconfig_relative_paths_and_tls_server_name(
    kube: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")  # not the kubeconfig's folder
    path = _relative_kubeconfig(kube, tmp_path, **{"tls-server-name": "localhost"})
    assert _whoami(RawClient(load_api_client(str(path)))) == "halfclose-test-admin"


def test_the_server_certificate_is_verified(kube: ControlPlane, tmp_path: Path) -> None:
    """A name the serving certificate does not carry is refused before any request is
    sent (status 0: no answer), never sent anyway."""
    path = _relative_kubeconfig(kube, tmp_path, **{"tls-server-name": "other.example"})
    client = RawClient(load_api_client(str(path)), 5.0)
    with pytest.raises(ApiError) as err:
        client.get("/api/v1/namespaces")
    assert err.value.status == 0 and "CERTIFICATE_VERIFY_FAILED" in str(err.value)
