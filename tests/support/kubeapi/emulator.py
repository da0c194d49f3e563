"""``KubeAPIEmulator``: the emulated API server on a loopback port, in its own thread.

The server runs on a private event loop in a background thread, so it serves sync
tests, kopf's ``KopfRunner`` thread and subprocesses (kubectl) alike.  The store is
only ever touched on that loop: the direct-access methods here hop onto it (and run
inline when already on it), so a test never races the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

import aiohttp.web
import yaml

from .builtin import KOPF_PEERING_CRDS, builtin_registry
from .resources import Registry, ResourceType, load_crd_files
from .server import Fault, KubeAPI, KubeAPIHandler, Settings
from .store import Store

T = TypeVar("T")

KUBECTL = Path(sys.prefix) / "bin" / "kubectl"
START_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0


class LoggedRequest(NamedTuple):
    method: str
    path: str
    query: dict[str, str]


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class KubeAPIEmulator:
    """A Kubernetes API server for tests: discovery, CRUD, watch, validation, tables.

    ``crd_paths``: YAML files whose ``CustomResourceDefinition`` documents are served
    (they are also listed as CRD objects, like on a cluster).  A CRD whose CEL rules or
    printer columns do not compile raises here, as the real server would reject it.
    """

    def __init__(
        self,
        crd_paths: Iterable[Path | str] = (),
        *,
        token: str = "emulator-token",
        bookmark_interval: float = 30.0,
        history_limit: int = 10_000,
    ) -> None:
        self.token = token
        self.registry: Registry = builtin_registry()
        self.store = Store(self.registry, history_limit=history_limit)
        for crd in [*KOPF_PEERING_CRDS, *load_crd_files(crd_paths)]:
            self.store.seed(crd)  # registers the CRD's resource types as a side effect
        self.settings = Settings(bookmark_interval=bookmark_interval)
        self.api = KubeAPI(self.store, self.registry, self.settings)
        self.kmock: KubeAPIHandler | None = None  # the KMock front: its DSL and request log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._port = 0
        self._workdir: Path | None = None
        self._clients: list[Any] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("the emulator is already started")
        self._workdir = Path(tempfile.mkdtemp(prefix="kubeapi-"))
        self._thread = threading.Thread(target=self._run, name="kubeapi-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self._startup_error is not None:
            self.stop()
            raise RuntimeError("the API emulator did not start") from self._startup_error
        self.settings.server_address = f"127.0.0.1:{self._port}"
        self._write_kubeconfig()
        return self

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT)
        self._thread = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # surfaced to start() or to internal_errors
            self._startup_error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        handler = KubeAPIHandler(api=self.api)
        async with handler:
            server = aiohttp.web.Server(handler, handler_cancellation=True)
            runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._port = runner.addresses[0][1]
            self.kmock = handler
            self._ready.set()
            try:
                await self._stopping.wait()
            finally:
                self.api.end_watches(abort=False)
                await asyncio.sleep(0)  # let the streams write their last chunk
                await runner.cleanup()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (inline if not started or already there)."""
        loop = self._loop
        if loop is None or not loop.is_running() or threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        loop.call_soon_threadsafe(run)
        return future.result(CALL_TIMEOUT)

    # ------------------------------------------------------------------ connection
    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("the emulator is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def kubeconfig(self) -> str:
        if self._workdir is None:
            raise RuntimeError("the emulator is not started")
        return str(self._workdir / "kubeconfig")

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
        }
        Path(self.kubeconfig).write_text(yaml.safe_dump(config), encoding="utf-8")

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the venv's kubectl against this server; a private discovery cache per emulator."""
        assert self._workdir is not None, "the emulator is not started"
        env = dict(
            os.environ,
            KUBECONFIG=self.kubeconfig,
            KUBERC="off",
            KUBECACHEDIR=str(self._workdir / "cache"),
        )
        cmd = [
            str(KUBECTL),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self._workdir / 'cache'}",
            *args,
        ]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this server (closed by ``stop()``)."""
        import kubernetes.client  # imported on use: kopf-only tests need not load it

        config = kubernetes.client.Configuration(host=self.url)
        config.api_key = {"authorization": self.token}
        config.api_key_prefix = {"authorization": "Bearer"}
        api_client = kubernetes.client.ApiClient(config)
        self._clients.append(api_client)
        return api_client

    def connection_info(self) -> Any:
        """A ``kopf.ConnectionInfo`` for ``@kopf.on.login()`` handlers in operator tests."""
        import kopf  # imported on use, like the client

        return kopf.ConnectionInfo(
            server=self.url, token=self.token, insecure=True, default_namespace="default"
        )

    # ------------------------------------------------------------------ faults
    def fail_next(
        self, n: int, status: int = 500, method: str | None = None, path_regex: str | None = None
    ) -> None:
        """The next ``n`` requests matching method/path (``re.search``) answer ``status``."""
        fault = Fault(n, status, method, re.compile(path_regex) if path_regex else None)
        self._call(lambda: self.api.faults.append(fault))

    def drop_watches(self, *, graceful: bool = False) -> int:
        """Disconnect every open watch now (abort the connection; ``graceful``: end the stream)."""
        return self._call(lambda: self.api.end_watches(abort=not graceful))

    @property
    def open_watches(self) -> int:
        return self._call(lambda: len(self.api.watches))

    # ------------------------------------------------------------------ state access
    @property
    def requests(self) -> list[LoggedRequest]:
        if self.kmock is None:
            return []
        reqs = list(self.kmock._requests)  # KMock's own log of every request it parsed
        return [LoggedRequest(str(r.method.value), r.url.path, dict(r.params)) for r in reqs]

    @property
    def internal_errors(self) -> list[Exception]:
        """Exceptions that escaped the emulated API (bugs or limitations), in order."""
        if self.kmock is None or not self.kmock.active:
            return []
        return list(self.kmock.errors)

    def _rt(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.registry.get(group, version, plural)
        if rt is None:
            raise KeyError(f"not served: {group}/{version}/{plural}")
        return rt

    def objects(
        self, group: str, version: str, plural: str, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        rt = self._rt(group, version, plural)
        return self._call(lambda: self.store.select(rt, namespace))

    def get_object(
        self, group: str, version: str, plural: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        rt = self._rt(group, version, plural)

        def get() -> dict[str, Any] | None:
            obj = self.store.find(rt.group_resource, namespace or "" if rt.namespaced else "", name)
            return None if obj is None else self.store.present(rt, obj)

        return self._call(get)

    def put_object(
        self, group: str, version: str, plural: str, obj: dict[str, Any]
    ) -> dict[str, Any]:
        """Store ``obj`` as given (status included, no validation), as a seed or a fake writer.

        Creates or replaces; fills uid/creationTimestamp/generation if absent; bumps the
        resourceVersion and notifies watchers.  A missing namespace is created.
        """
        rt = self._rt(group, version, plural)
        return self._call(lambda: self.store.seed(obj, rt))

    def delete_object(
        self, group: str, version: str, plural: str, name: str, namespace: str | None = None
    ) -> dict[str, Any]:
        """DELETE as a client would (finalizers, GC apply); returns the response body."""
        rt = self._rt(group, version, plural)
        return self._call(lambda: self.store.delete(rt, namespace or "", name).obj)

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05
    ) -> None:
        """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            time.sleep(interval)


def crd_files(directory: Path) -> Sequence[Path]:
    return sorted(directory.glob("*.yaml")) if directory.is_dir() else []
