"""Where the API server is and how to prove who we are: kubeconfig or in-cluster.

What the agent needs of client-go's ``clientcmd`` / ``rest.InClusterConfig``,
over the standard library (``ssl``), so the agent does not import the
``kubernetes`` package (46 MiB of RSS for a client it only used as a transport):

- a kubeconfig's current context: ``server`` (+ ``tls-server-name``,
  ``insecure-skip-tls-verify``), the CA as ``certificate-authority`` or
  ``-data``, client certificates as files or ``-data``, a ``token`` or
  ``tokenFile``; relative paths are relative to the kubeconfig's folder, as
  kubectl reads them.  ``exec`` and ``auth-provider`` plugins are refused with
  one clear line (the agent runs in-cluster; a kubeconfig is for tests and
  development).
- in-cluster: ``KUBERNETES_SERVICE_HOST``/``_PORT``, the service account's
  ``ca.crt`` and ``token``.  The token is a bound, expiring token that the
  kubelet rotates (it swaps the projected volume's ``..data`` symlink), so it
  is re-read whenever the file changes (one ``stat`` per request), as
  client-go's cached token source does, never only once at start.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ConfigError(ValueError):
    """A kubeconfig or in-cluster environment the client cannot use (one line)."""


class TokenFile:
    """A bearer token read from a file, re-read when the file changes.

    The check is a ``stat`` of the path (following the kubelet's symlinks):
    a rotation replaces the file, so its inode, size or mtime changes.  A file
    that cannot be read keeps the last good token: the API server's 401 says
    more than an error here would, and the next request looks again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._token = ""
        self.reads = 0  # how often the file was read: for tests
        self._read()
        if not self._token:
            raise ConfigError(f"token file {path} is empty or unreadable")

    def _read(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if signature == self._signature:
                return
            token = Path(self.path).read_text(encoding="utf-8").strip()
        except OSError:
            return
        self.reads += 1
        self._signature = signature
        if token:
            self._token = token

    def __call__(self) -> str:
        with self._lock:
            self._read()
            return self._token


def static_token(token: str) -> Callable[[], str]:
    return lambda: token


@dataclass(frozen=True)
class ClusterConfig:
    """One API server: address, TLS context and credentials (``token`` per request)."""

    scheme: str  # "https" or "http"
    host: str  # no brackets around an IPv6 address
    port: int
    base_path: str  # the server URL's path, "" for most ("https://lb/k8s" gives "/k8s")
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None  # the name the certificate must carry (tls-server-name)
    token: Callable[[], str] | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


# ----------------------------------------------------------------------------- TLS


def _tls_context(
    *,
    ca_file: str | None = None,
    ca_data: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    cert_data: bytes | None = None,
    key_data: bytes | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file or ca_data:
        context.load_verify_locations(cafile=ca_file, cadata=ca_data)
    else:
        context.load_default_certs()  # a server with a publicly trusted certificate
    if cert_file or cert_data:
        with _pem_files(cert_file, key_file, cert_data, key_data) as (cert, key):
            context.load_cert_chain(cert, key)
    return context


@contextlib.contextmanager
def _pem_files(
    cert_file: str | None, key_file: str | None, cert_data: bytes | None, key_data: bytes | None
) -> Iterator[tuple[str, str]]:
    """``load_cert_chain`` reads only files: inline data goes to a private temp
    folder (0700) for the duration of the load, then is removed."""
    if cert_data is None and key_data is None:
        if not cert_file or not key_file:
            raise ConfigError("a client certificate needs both a certificate and a key")
        yield cert_file, key_file
        return
    with tempfile.TemporaryDirectory(prefix="halfclose-kube-") as folder:
        cert = cert_file or _write_private(Path(folder) / "client.crt", cert_data)
        key = key_file or _write_private(Path(folder) / "client.key", key_data)
        if not cert or not key:
            raise ConfigError("a client certificate needs both a certificate and a key")
        yield cert, key


def _write_private(path: Path, data: bytes | None) -> str:
    if data is None:
        return ""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return str(path)


# ----------------------------------------------------------------------------- kubeconfig


def _b64(value: object, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} is not valid base64") from None


def _named(entries: object, name: str, kind: str) -> Mapping[str, Any]:
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, Mapping) and entry.get("name") == name:
            body = entry.get(kind)
            return body if isinstance(body, Mapping) else {}
    raise ConfigError(f"no {kind} named {name!r}")


def _address(server: str) -> tuple[str, str, int, str]:
    parts = urlsplit(server)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"server {server!r} is not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"server {server!r} has a bad port") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def from_kubeconfig(path: str, context: str | None = None) -> ClusterConfig:
    """The cluster and credentials of ``context`` (default: the current context)."""
    import yaml  # noqa: PLC0415 - only here: in a pod (in-cluster) the agent never parses YAML

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read kubeconfig {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"kubeconfig {path} is not YAML: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(f"kubeconfig {path} is not a mapping")
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(f"kubeconfig {path} has no current-context")
    ctx = _named(doc.get("contexts"), str(name), "context")
    cluster = _named(doc.get("clusters"), str(ctx.get("cluster") or ""), "cluster")
    user = _named(doc.get("users"), str(ctx.get("user") or ""), "user") if ctx.get("user") else {}
    folder = Path(path).resolve().parent

    def file(value: object) -> str | None:
        return str(folder / str(value)) if value else None  # an absolute value stays as is

    for plugin in ("exec", "auth-provider", "username"):
        if user.get(plugin):
            raise ConfigError(f"kubeconfig user uses {plugin!r}: not supported by halfclose-agent")
    scheme, host, port, base_path = _address(str(cluster.get("server") or ""))
    context_ = None
    if scheme == "https":
        ca_data = cluster.get("certificate-authority-data")
        cert_data = user.get("client-certificate-data")
        key_data = user.get("client-key-data")
        try:
            context_ = _tls_context(
                ca_file=file(cluster.get("certificate-authority")),
                ca_data=_b64(ca_data, "certificate-authority-data").decode("ascii", "replace")
                if ca_data
                else None,
                cert_file=file(user.get("client-certificate")),
                key_file=file(user.get("client-key")),
                cert_data=_b64(cert_data, "client-certificate-data") if cert_data else None,
                key_data=_b64(key_data, "client-key-data") if key_data else None,
                insecure=bool(cluster.get("insecure-skip-tls-verify")),
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"kubeconfig {path}: TLS material: {exc}") from None
    token: Callable[[], str] | None = None
    if user.get("token"):
        token = static_token(str(user["token"]))
    elif user.get("tokenFile"):
        token = TokenFile(file(user["tokenFile"]) or "")
    return ClusterConfig(
        scheme=scheme,
        host=host,
        port=port,
        base_path=base_path,
        ssl_context=context_,
        server_hostname=str(cluster.get("tls-server-name") or "") or None,
        token=token,
    )


# ----------------------------------------------------------------------------- in-cluster


def in_cluster(
    environ: Mapping[str, str], service_account_dir: str = SERVICE_ACCOUNT_DIR
) -> ClusterConfig:
    """The pod's API server (the ``kubernetes`` Service's env) and service account."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ConfigError(
            "not in a cluster (KUBERNETES_SERVICE_HOST/PORT unset) and no KUBECONFIG given"
        )
    if not port.isdigit():
        raise ConfigError(f"KUBERNETES_SERVICE_PORT={port!r} is not a port")
    folder = Path(service_account_dir)
    try:
        context = _tls_context(ca_file=str(folder / "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"service account CA {folder / 'ca.crt'}: {exc}") from None
    return ClusterConfig(
        scheme="https",
        host=host.strip("[]"),
        port=int(port),
        base_path="",
        ssl_context=context,
        server_hostname=None,
        token=TokenFile(str(folder / "token")),
    )
