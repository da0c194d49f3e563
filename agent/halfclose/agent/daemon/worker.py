"""The ``Kernel`` Protocol across a process boundary: a privileged worker and its proxy.

``start_kernel_worker`` forks (``kernel.privsep``) before the agent has a
Kubernetes client or an HTTP server.  The child builds the in-process kernel
(``LocalKernel``: netns handles, sock_diag, ctnetlink, sysctls), forgets the
API credentials it inherited, and answers the ``Kernel`` methods, nothing
else.  The parent gets a ``WorkerKernel`` (every method a request over the
socketpair), drops all its capabilities, and then talks to the network.

Arguments and results cross as JSON decoded by the *declared* types of the
``Kernel`` Protocol (``core.wire``): the worker builds exactly the dataclasses
its methods take, whatever the unprivileged side sends.  The one file
descriptor that crosses is a netns's conntrack event socket
(``OpenedNetns.events_fd``), passed with SCM_RIGHTS so the parent's loop can
poll it; reading it stays the worker's (``drain_events``).  Errors keep their
class: the typed ``halfclose.errors`` by name (an allowlist), OS errors by
errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import inspect
import logging
import os
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from halfclose import errors as error_types
from halfclose.agent.core.model import SocketRecord
from halfclose.agent.core.outcome import ActionReport, PatchReport
from halfclose.agent.core.plan import Plan
from halfclose.agent.core.wire import decode, encode
from halfclose.agent.daemon.ports import EventBatch, Kernel, OpenedNetns
from halfclose.agent.engine.scan import ScanResult, ScanSettings
from halfclose.agent.kernel.podnetns import PodNetns
from halfclose.agent.kernel.privsep import Handler, WorkerClient, start_worker

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CLONE_NEWNS = 0x00020000
MS_REC, MS_SLAVE = 0x4000, 0x80000
MNT_DETACH = 2


@cache
def kernel_methods() -> dict[str, tuple[dict[str, Any], Any]]:
    """Method name -> (parameter name -> declared type, declared return type)."""
    out: dict[str, tuple[dict[str, Any], Any]] = {}
    for name, fn in inspect.getmembers(Kernel, inspect.isfunction):
        if name.startswith("_"):
            continue
        hints = typing.get_type_hints(fn)
        params = {p: hints[p] for p in inspect.signature(fn).parameters if p != "self"}
        out[name] = (params, hints.get("return", type(None)))
    return out


def error_classes() -> dict[str, Callable[[str], BaseException]]:
    """The typed errors that cross by name: halfclose.errors' classes, nothing else."""
    return {
        name: cls
        for name, cls in vars(error_types).items()
        if isinstance(cls, type) and issubclass(cls, error_types.UserError)
    }


class GuardedKernel:
    """The worker's own checks, whatever the unprivileged side asks.

    A netns is opened only if this worker's ``resolve`` returned exactly that
    (inode, path) for some pod, and never when it is the node's own: so scans,
    kills and sysctl writes (which all go through an opened netns) can only
    ever touch a pod's namespace, not the host's, even for a caller that lies.
    """

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._resolved: set[tuple[int, str]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kernel, name)

    def resolve(
        self,
        container_ids: frozenset[str],
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns | None:
        found = self.kernel.resolve(container_ids, pod_ips, host_ips)
        if found is not None:
            self._resolved.add((found.inode, found.path))
        return found

    def open_netns(self, inode: int, path: str) -> OpenedNetns:
        if inode in self.kernel.host_netns_inodes():
            raise error_types.PermissionDenied(f"netns {inode} is the host's: never opened")
        if (inode, path) not in self._resolved:
            raise error_types.PermissionDenied(f"{path} was not resolved for a pod")
        return self.kernel.open_netns(inode, path)


def kernel_handlers(kernel: Kernel) -> dict[str, Handler]:
    """The worker's handler table: each ``Kernel`` method, arguments decoded by its types."""
    kernel = typing.cast(Kernel, GuardedKernel(kernel))

    def handler(name: str, params_types: Mapping[str, Any]) -> Handler:
        def handle(params: Mapping[str, Any], fds: list[int]) -> tuple[Any, Sequence[int]]:
            for fd in fds:  # no method takes a descriptor from the unprivileged side
                os.close(fd)
            unknown = set(params) - set(params_types)
            if unknown:
                raise ValueError(f"{name}: unknown arguments {sorted(unknown)}")
            args = {p: decode(t, params[p]) for p, t in params_types.items() if p in params}
            result = getattr(kernel, name)(**args)
            out: list[int] = []
            if isinstance(result, OpenedNetns) and result.events_fd is not None:
                out.append(os.dup(result.events_fd))  # the worker keeps its own to read
            return encode(result), out

        return handle

    return {name: handler(name, params) for name, (params, _) in kernel_methods().items()}


def forget_credentials() -> None:
    """The worker needs no API access: drop what the process inherited for it.

    KUBECONFIG goes from the environment, and the pod's service-account token
    mount is detached in a mount namespace of the worker's own (it holds
    CAP_SYS_ADMIN for setns anyway): the token file is then not there to read.
    """
    os.environ.pop("KUBECONFIG", None)
    if not os.path.ismount(SERVICE_ACCOUNT_DIR):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        log.warning("worker: unshare(CLONE_NEWNS): %s", os.strerror(ctypes.get_errno()))
        return
    # Private to this namespace from here on: the detach must not reach the pod's.
    if libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
        log.warning("worker: making / a slave mount: %s", os.strerror(ctypes.get_errno()))
        return
    if libc.umount2(SERVICE_ACCOUNT_DIR.encode(), MNT_DETACH) != 0:
        log.warning(
            "worker: detaching %s: %s", SERVICE_ACCOUNT_DIR, os.strerror(ctypes.get_errno())
        )


class WorkerKernel:
    """``Kernel`` by requests to the privileged worker (the parent's side)."""

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self._fds: dict[int, int] = {}  # inode -> the parent's copy of its event socket

    def _call(self, method: str, **args: Any) -> Any:
        params, returns = kernel_methods()[method]
        assert set(args) <= set(params), (method, args)
        result, fds = self.client.call(method, {k: encode(v) for k, v in args.items()})
        value = decode(returns, result)
        if isinstance(value, OpenedNetns) and value.events_fd is not None:
            if not fds:
                raise OSError(f"{method}: the worker sent no event socket")
            old = self._fds.pop(value.inode, None)
            if old is not None:
                os.close(old)
            self._fds[value.inode] = fds[0]
            for extra in fds[1:]:
                os.close(extra)
            return OpenedNetns(value.inode, value.label, fds[0])
        for fd in fds:
            os.close(fd)
        return value

    def resolve(
        self,
        container_ids: frozenset[str],
        pod_ips: Iterable[str] = (),
        host_ips: Iterable[str] = (),
    ) -> PodNetns | None:
        found: PodNetns | None = self._call(
            "resolve",
            container_ids=container_ids,
            pod_ips=tuple(pod_ips),
            host_ips=tuple(host_ips),
        )
        return found

    def invalidate(self) -> None:
        self._call("invalidate")

    def host_netns_inodes(self) -> frozenset[int]:
        inodes: frozenset[int] = self._call("host_netns_inodes")
        return inodes

    def open_netns(self, inode: int, path: str) -> OpenedNetns:
        opened: OpenedNetns = self._call("open_netns", inode=inode, path=path)
        return opened

    def close_netns(self, inode: int) -> None:
        fd = self._fds.pop(inode, None)
        if fd is not None:
            os.close(fd)
        self._call("close_netns", inode=inode)

    def scan(self, inode: int, settings: ScanSettings) -> ScanResult:
        result: ScanResult = self._call("scan", inode=inode, settings=settings)
        return result

    def attach_owners(self, inode: int, result: ScanResult) -> ScanResult:
        owned: ScanResult = self._call("attach_owners", inode=inode, result=result)
        return owned

    def recheck(
        self, inode: int, sockets: tuple[SocketRecord, ...], settings: ScanSettings
    ) -> ScanResult | None:
        result: ScanResult | None = self._call(
            "recheck", inode=inode, sockets=sockets, settings=settings
        )
        return result

    def remediate(self, inode: int, plan: Plan, watch_unpaired: bool = True) -> ActionReport:
        report: ActionReport = self._call(
            "remediate", inode=inode, plan=plan, watch_unpaired=watch_unpaired
        )
        return report

    def verify_upstreams(self, inode: int, report: ActionReport) -> ActionReport:
        verified: ActionReport = self._call("verify_upstreams", inode=inode, report=report)
        return verified

    def drain_events(self, inode: int) -> EventBatch:
        batch: EventBatch = self._call("drain_events", inode=inode)
        return batch

    def watch_new(self, inode: int, on: bool) -> None:
        self._call("watch_new", inode=inode, on=on)

    def patch_sysctl(self, inode: int, timeout: int) -> PatchReport:
        report: PatchReport = self._call("patch_sysctl", inode=inode, timeout=timeout)
        return report

    def restore_sysctl(self, inode: int) -> PatchReport:
        report: PatchReport = self._call("restore_sysctl", inode=inode)
        return report

    def restore_inode(self, inode: int) -> bool:
        done: bool = self._call("restore_inode", inode=inode)
        return done

    def patched_inodes(self) -> frozenset[int]:
        inodes: frozenset[int] = self._call("patched_inodes")
        return inodes

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.client.close()


def start_kernel_worker(make_kernel: Callable[[], Kernel]) -> WorkerKernel:
    """Fork the worker (it runs ``make_kernel`` and serves it); the caller then drops
    its capabilities (``privsep.drop_capabilities``)."""

    def in_worker() -> dict[str, Handler]:
        forget_credentials()
        return kernel_handlers(make_kernel())

    return WorkerKernel(start_worker(in_worker, error_classes()))
