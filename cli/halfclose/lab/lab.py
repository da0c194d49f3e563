"""The leak lab: build it, make traffic in it, show it, take it down.

``Lab`` composes the pieces: ``topology`` (names, addresses), ``rules`` (NAT
per mesh style and backend), ``netns`` (commands in namespaces),
``supervise`` (daemons), ``state`` (the state file) and the daemons
themselves (``proxy``, ``upstream``, ``app``).  See docs/lab.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from halfclose.agent.core.model import Endpoint
from halfclose.lab import control, netns, rules, ss, supervise
from halfclose.lab.errors import LabError
from halfclose.lab.model import (
    LabStatus,
    LateClose,
    LeakedPair,
    PodStatus,
    ProcessInfo,
    ProxiedPair,
    Teardown,
)
from halfclose.lab.settings import (
    DEFAULT_RUN_DIR,
    INBOUND_APP_PORT,
    MAX_COUNT,
    LabSettings,
    validate_prefix,
)
from halfclose.lab.state import LabPaths, LabState, ProcessRecord
from halfclose.lab.topology import SERVICE, Topology, netns_pattern

CLOSE_WAIT_SYSCTL = "net.netfilter.nf_conntrack_tcp_timeout_close_wait"
FIN_WAIT_SYSCTL = "net.netfilter.nf_conntrack_tcp_timeout_fin_wait"
BASE_TOOLS = ("ip", "ss", "nsenter", "sysctl")
READY_TIMEOUT = 30.0
VERIFY_TIMEOUT = 5.0
# The holder's own bounds for one request: connecting and seeing the
# half-close take at most 30 s each (app.STEP_TIMEOUT), plus slack.
HOLDER_STEPS = 70.0


class Lab:
    """A leak lab (one upstream netns, ``pods`` pod netns with a sidecar each).

    Build it with ``up()`` or reopen a running one with ``Lab.attach(prefix)``;
    every method works from any process, through the state file.
    """

    def __init__(self, settings: LabSettings | None = None) -> None:
        self.settings = settings or LabSettings()
        self.topology = _topology(self.settings)
        self.paths = LabPaths(self.settings.run_dir, self.settings.prefix)
        self._state: LabState | None = None
        self._children: list[subprocess.Popen[bytes]] = []

    @classmethod
    def attach(cls, prefix: str, run_dir: str = DEFAULT_RUN_DIR) -> Lab:
        """Reopen an existing lab from its state file."""
        paths = LabPaths(run_dir, validate_prefix(prefix))
        state = LabState.load(paths.state)
        if state is None:
            raise LabError(
                f"no lab {prefix!r} (no state in {paths.dir}): "
                f"run `halfclose lab up --prefix {prefix}`"
            )
        lab = cls(dataclasses.replace(state.settings, run_dir=run_dir))
        lab._adopt(state)
        return lab

    def __repr__(self) -> str:
        return f"Lab(prefix={self.settings.prefix!r}, pods={self.settings.pods})"

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- identities -------------------------------------------------------------

    @property
    def capture_ports(self) -> tuple[int, int]:
        """(outbound, inbound), e.g. (15001, 15006)."""
        return self.settings.mesh.capture_ports

    @property
    def service(self) -> Endpoint:
        """Where the apps connect (before the REDIRECT): 203.0.113.10:7777."""
        return SERVICE

    @property
    def upstream_netns(self) -> str:
        return self.topology.upstream_netns

    def pod_netns(self, pod: int) -> str:
        return self.topology.pod_netns(pod)

    def pod_netns_path(self, pod: int) -> str:
        return netns.path(self.topology.pod_netns(pod))

    def pod_ip(self, pod: int) -> str:
        return str(self.topology.pod_ip(pod))

    def proxy_pid(self, pod: int) -> int:
        """The pid holding the pod's proxy sockets (ambient: the one ztunnel)."""
        if self._current_state().settings.mesh.node_proxy:
            self.topology.pod_netns(pod)  # range check
            return self._record("ztunnel", None).pid
        return self._record("proxy", pod).pid

    @property
    def node_netns(self) -> str | None:
        """Ambient: ztunnel's own netns (``<prefix>-zt``); None for sidecar styles."""
        return self.topology.node_netns if self.settings.mesh.node_proxy else None

    def inbound_service(self, pod: int) -> Endpoint:
        """Where inbound clients connect: the pod's app port (pod-ip:8080)."""
        return Endpoint(self.topology.pod_ip(pod), INBOUND_APP_PORT)

    @property
    def inbound_local_port(self) -> int:
        """The local port of the proxy's inbound downstream sockets.

        15006 (or 4143) behind a REDIRECT; the original port (8080) behind
        TPROXY, where nothing is translated.
        """
        mesh = self.settings.mesh
        return INBOUND_APP_PORT if mesh.inbound_tproxy else mesh.inbound_port

    def app_pid(self, pod: int) -> int | None:
        record = self._current_state().find("app", pod)
        return record.pid if record else None

    @property
    def upstream_pid(self) -> int:
        return self._record("upstream", None).pid

    # -- up / down --------------------------------------------------------------

    def up(self) -> None:
        """Build the lab; on any failure tear down what was made, then raise."""
        self._preflight()
        self._claim()
        self._state = LabState(self.settings)
        try:
            self._save()
            self._build_network()
            self._start_upstream()
            self._start_proxies()
            self._state.phase = "up"
            self._save()
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise

    def down(self) -> Teardown:
        """Remove everything the lab made, even from a partial state.  Idempotent.

        Kills the recorded processes (when still the same process) and every
        process inside the lab's namespaces, deletes the namespaces named like
        this lab's, and removes the state dir.  Never fails on parts already gone.
        """
        _require_root()
        with contextlib.suppress(LabError):
            self._state = LabState.load(self.paths.state) or self._state
        pattern = netns_pattern(self.settings.prefix)
        names = [n for n in netns.names() if pattern.fullmatch(n)]
        pids: set[int] = set()
        if self._state is not None:
            pids |= {r.pid for r in self._state.processes if supervise.alive(r.pid, r.start_time)}
        for name in names:
            pids |= set(netns.pids_in(name))
        pids.discard(os.getpid())  # `nsenter ... halfclose lab down` must not kill itself
        killed = supervise.terminate(pids)
        self._reap()
        # Pods before the upstream: their veths leave the bridge first.
        netns.delete(sorted(names, key=lambda n: n.endswith("-up")))
        removed = os.path.isdir(self.paths.dir)
        shutil.rmtree(self.paths.dir, ignore_errors=True)
        self._state = None
        return Teardown(tuple(names), tuple(killed), removed)

    # -- traffic ----------------------------------------------------------------

    def leak(self, count: int = 1, pod: int = 0, *, inbound: bool = False) -> list[LeakedPair]:
        """Form ``count`` leaked pairs at once; returns when all are verified to exist.

        Verified: the app saw the proxy's FIN, conntrack had dropped every NAT
        entry before the app closed (checked by the app), and the proxy's
        FIN-WAIT-2 and CLOSE-WAIT sockets are there (checked here with ss).

        ``inbound``: the connections come from clients outside the pod (in the
        upstream netns) to the pod's app port 8080, through the proxy's
        inbound capture; the in-pod app server closes and the client closes
        once the pod's entry is gone.  The pair's ``app`` is then the client.
        """
        self._check(count, pod)
        cw = self._current_state().settings.close_wait_timeout
        timeout = 2 * cw + 10 + HOLDER_STEPS + count / 50
        reply = self._ask(pod, {"op": "leak", "count": count}, timeout, inbound)
        return self._verify(pod, reply["pairs"], "FIN-WAIT-2", "CLOSE-WAIT", inbound)

    def idle(self, count: int = 1, pod: int = 0, *, inbound: bool = False) -> list[ProxiedPair]:
        """``count`` idle ESTABLISHED connections, held until ``down``."""
        self._check(count, pod)
        reply = self._ask(pod, {"op": "idle", "count": count}, HOLDER_STEPS + count / 50, inbound)
        return self._verify(pod, reply["pairs"], "ESTAB", "ESTAB", inbound)

    def live_half_close(
        self, count: int = 1, pod: int = 0, *, inbound: bool = False
    ) -> list[ProxiedPair]:
        """``count`` connections the upstream half-closed while the app keeps sending.

        The proxy's downstream socket is FIN-WAIT-2 but its conntrack entry is
        kept alive by the app's traffic: at-risk, never leaked.  Held until ``down``.
        """
        self._check(count, pod)
        reply = self._ask(pod, {"op": "live", "count": count}, HOLDER_STEPS + count / 50, inbound)
        return self._verify(pod, reply["pairs"], "FIN-WAIT-2", "CLOSE-WAIT", inbound)

    def late_close(
        self, count: int = 1, after_seconds: float = 10.0, pod: int = 0, *, inbound: bool = False
    ) -> LateClose:
        """``count`` connections half-closed now; the app closes them ``after_seconds`` later.

        If nothing intervenes and ``after_seconds`` exceeds the close_wait
        timeout, they leak; remediation tests act in between.
        """
        self._check(count, pod)
        if not after_seconds >= 0:
            raise LabError(f"bad after_seconds {after_seconds!r}: >= 0")
        reply = self._ask(
            pod,
            {"op": "late", "count": count, "after": after_seconds},
            HOLDER_STEPS + count / 50,
            inbound,
        )
        pairs = self._verify(pod, reply["pairs"], "FIN-WAIT-2", "CLOSE-WAIT", inbound)
        return LateClose(pod, int(reply["batch"]), tuple(pairs), float(reply["closes_at"]), inbound)

    def wait_late_closed(self, late: LateClose, timeout: float | None = None) -> None:
        """Block until the app has closed a ``late_close`` batch (bounded)."""
        if timeout is None:
            timeout = max(0.0, late.closes_at - time.time()) + 10.0
        deadline = time.monotonic() + timeout
        while (
            str(late.batch)
            in self._ask(late.pod, {"op": "status"}, 10, late.inbound)["late_pending"]
        ):
            if time.monotonic() > deadline:
                raise LabError(f"late-close batch {late.batch} still open after {timeout:.0f}s")
            time.sleep(min(0.1, max(0.01, late.closes_at - time.time())))

    # -- status -----------------------------------------------------------------

    def status(self) -> LabStatus:
        """What exists now: namespaces, processes, and the sockets of each pod."""
        _require_root()
        prefix = self.settings.prefix
        state = LabState.load(self.paths.state)
        named = [n for n in netns.names() if netns_pattern(prefix).fullmatch(n)]
        if state is None:
            return LabStatus(
                prefix, bool(named), None, None, None, None, None, stray_netns=tuple(named)
            )
        settings = state.settings
        topo = _topology(settings)
        known = set(topo.all_netns)
        pods = tuple(self._pod_status(state, topo, i) for i in range(settings.pods))
        upstream = state.find("upstream", None)
        return LabStatus(
            prefix=prefix,
            exists=True,
            phase=state.phase,
            settings=settings,
            capture_ports=settings.mesh.capture_ports,
            upstream_netns=topo.upstream_netns,
            upstream=_process_info(upstream) if upstream else None,
            pods=pods,
            stray_netns=tuple(n for n in named if n not in known),
        )

    def pod_status(self, pod: int) -> PodStatus:
        """``status()`` for one pod only (cheap in a 100-pod lab)."""
        _require_root()
        state = self._current_state()
        return self._pod_status(state, _topology(state.settings), pod)

    def _pod_status(self, state: LabState, topo: Topology, pod: int) -> PodStatus:
        name = topo.pod_netns(pod)
        proxy = state.find("proxy", pod) or state.find("ztunnel", None)
        app = state.find("app", pod)
        proxy_info = _process_info(proxy) if proxy else None
        app_info = _process_info(app) if app else None
        if not netns.exists(name):
            return PodStatus(pod, name, str(topo.pod_ip(pod)), False, None, proxy_info, app_info)
        views = ss.sockets(name, processes=True)
        capture = (*state.settings.mesh.capture_ports, INBOUND_APP_PORT)
        proxy_pid = proxy.pid if proxy else None
        mine = tuple(
            v
            for v in views
            if v.state != "LISTEN" and (v.local_port in capture or v.pid == proxy_pid)
        )
        held: dict[str, Any] | None = None
        if app_info is not None and app_info.alive:
            with contextlib.suppress(LabError):
                held = control.request(self.paths.control(pod), {"op": "status"}, 5)
                held.pop("ok", None)
        return PodStatus(
            index=pod,
            netns=name,
            ip=str(topo.pod_ip(pod)),
            exists=True,
            close_wait_timeout=int(netns.read_sysctl(name, CLOSE_WAIT_SYSCTL)),
            proxy=proxy_info,
            app=app_info,
            sockets_by_state=dict(Counter(v.state for v in views)),
            proxy_sockets=mine,
            app_held=held,
        )

    # -- building ---------------------------------------------------------------

    def _preflight(self) -> None:
        _require_root()
        netns.require_tools((*BASE_TOOLS, *rules.tools_for(self.settings.backend)))

    def _claim(self) -> None:
        """Make the state dir (exclusively: it is the lab's lock against a second ``up``)."""
        prefix = self.settings.prefix
        taken = [n for n in netns.names() if netns_pattern(prefix).fullmatch(n)]
        advice = f"run `halfclose lab down --prefix {prefix}` first"
        if taken:
            raise LabError(f"lab {prefix!r} already exists (netns {taken[0]}): {advice}")
        os.makedirs(self.settings.run_dir, mode=0o755, exist_ok=True)
        try:
            os.mkdir(self.paths.dir, 0o755)
        except FileExistsError:
            raise LabError(f"lab {prefix!r} already exists ({self.paths.dir}): {advice}") from None

    def _build_network(self) -> None:
        topo = self.topology
        netns.add(topo.all_netns)
        netns.ip_batch(topo.upstream_netns, topo.upstream_batch())
        if self.settings.mesh.node_proxy:
            netns.ip_batch(topo.node_netns, ["link set lo up"])
        if self.settings.drop_invalid:
            self._load_rules(topo.upstream_netns, rules.network_rules(self.settings.backend))
        # Each pod is a handful of short commands; a few at a time hides their latency.
        with ThreadPoolExecutor(max_workers=min(4, self.settings.pods)) as pool:
            list(pool.map(self._setup_pod, range(self.settings.pods)))

    def _setup_pod(self, pod: int) -> None:
        name = self.topology.pod_netns(pod)
        mesh = self.settings.mesh
        netns.ip_batch(name, self.topology.pod_batch(pod) + rules.pod_routes(mesh))
        load = rules.pod_rules(
            mesh, self.settings.backend, drop_invalid=self.settings.pod_drop_invalid
        )
        self._load_rules(name, load)
        # Per netns: only this pod's conntrack changes (the host keeps its value).
        netns.write_sysctl(name, CLOSE_WAIT_SYSCTL, str(self.settings.close_wait_timeout))
        if self.settings.fin_wait_timeout is not None:
            netns.write_sysctl(name, FIN_WAIT_SYSCTL, str(self.settings.fin_wait_timeout))

    @staticmethod
    def _load_rules(name: str, load: rules.RuleLoad) -> None:
        netns.run_in(name, load.argv, stdin=load.text)

    def _daemon_argv(self, module: str, *args: str) -> list[str]:
        return [
            sys.executable, "-m", f"halfclose.lab.{module}",
            "--lab", self.settings.prefix,
            "--max-lifetime", str(self.settings.max_lifetime),
            *args,
        ]  # fmt: skip

    def _start_upstream(self) -> None:
        name = self.topology.upstream_netns
        log = self.paths.log("upstream", None)
        argv = self._daemon_argv("upstream", "--listen", str(SERVICE))
        proc = self._launch("upstream", None, name, argv, log)
        supervise.wait_ready([("upstream server", proc, log)], READY_TIMEOUT)

    def _proxy_args(self) -> list[str]:
        mesh = self.settings.mesh
        args = ["--uid", str(mesh.proxy_uid)]
        for port in mesh.listen_ports:
            args += ["--port", str(port)]
        if mesh.inbound_tproxy:
            args += ["--tproxy-port", str(mesh.inbound_port)]
        if self.settings.listens_dual_stack:
            args.append("--dual-stack")
        if mesh.mark is not None:
            args += ["--mark", hex(mesh.mark)]
        if self.settings.proxy_idle_timeout is not None:
            args += ["--idle-timeout", str(self.settings.proxy_idle_timeout)]
        return args

    def _start_proxies(self) -> None:
        if self.settings.mesh.node_proxy:
            self._start_ztunnel()
            return
        started = []
        for pod in range(self.settings.pods):
            args = self._proxy_args()
            log = self.paths.log("proxy", pod)
            name = self.topology.pod_netns(pod)
            proc = self._launch("proxy", pod, name, self._daemon_argv("proxy", *args), log)
            started.append((f"proxy of pod {pod}", proc, log))
        supervise.wait_ready(started, READY_TIMEOUT + 0.2 * len(started))

    def _start_ztunnel(self) -> None:
        """Ambient: one ztunnel in its own netns, serving inside every pod's netns."""
        args = [*self._proxy_args(), "--name", "lab-ztunnel"]
        for pod in range(self.settings.pods):
            args += ["--netns", netns.path(self.topology.pod_netns(pod))]
        log = self.paths.log("ztunnel", None)
        argv = self._daemon_argv("proxy", *args)
        proc = self._launch("ztunnel", None, self.topology.node_netns, argv, log)
        supervise.wait_ready([("ztunnel", proc, log)], READY_TIMEOUT + 0.05 * self.settings.pods)

    def _launch(
        self, role: str, pod: int | None, name: str, argv: Sequence[str], log: str
    ) -> subprocess.Popen[bytes]:
        proc = supervise.launch(name, argv, log)
        self._children.append(proc)
        assert self._state is not None
        self._state.processes.append(
            ProcessRecord(role, pod, proc.pid, supervise.start_time(proc.pid), name)
        )
        self._save()  # before waiting: a crash from here on still knows the pid
        return proc

    def _ensure_app(self, pod: int, inbound: bool = False) -> None:
        """Start the pod's app holder on first use (a 100-pod lab needs only its proxies).

        ``inbound``: the pod's app server (:8080, in the pod) and the holder of
        its inbound clients (in the upstream netns, waiting on the pod's
        conntrack) instead.
        """
        role = "client" if inbound else "app"
        with self._locked():
            state = LabState.load(self.paths.state)
            if state is None:
                raise LabError(f"lab {self.settings.prefix!r} is gone")
            self._adopt(state)
            record = state.find(role, pod)
            if record is not None and supervise.alive(record.pid, record.start_time):
                return
            settings = state.settings
            pod_netns = self.topology.pod_netns(pod)
            if inbound:
                self._ensure_server(state, pod)
            # Send well inside the close_wait timeout so the entry never lapses.
            interval = min(1.0, settings.close_wait_timeout / 4)
            service = self.inbound_service(pod) if inbound else SERVICE
            args = [
                "--control", self.paths.control(pod, role),
                "--service", str(service),
                "--close-wait-timeout", str(settings.close_wait_timeout),
                "--live-interval", str(interval),
            ]  # fmt: skip
            if inbound:
                args += ["--conntrack-netns", netns.path(pod_netns), "--name", "lab-client"]
            argv = self._daemon_argv("app", *args)
            log = self.paths.log(role, pod)
            where = self.topology.upstream_netns if inbound else pod_netns
            proc = self._launch(role, pod, where, argv, log)
            supervise.wait_ready([(f"{role} of pod {pod}", proc, log)], READY_TIMEOUT)

    def _ensure_server(self, state: LabState, pod: int) -> None:
        """The pod's own app server on :8080 (the inbound connections' destination)."""
        record = state.find("server", pod)
        if record is not None and supervise.alive(record.pid, record.start_time):
            return
        argv = self._daemon_argv(
            "upstream", "--listen", f"0.0.0.0:{INBOUND_APP_PORT}", "--name", "lab-server"
        )
        log = self.paths.log("server", pod)
        proc = self._launch("server", pod, self.topology.pod_netns(pod), argv, log)
        supervise.wait_ready([(f"app server of pod {pod}", proc, log)], READY_TIMEOUT)

    # -- helpers ----------------------------------------------------------------

    def _check(self, count: int, pod: int) -> None:
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
            raise LabError(f"bad count {count!r}: 1..{MAX_COUNT}")
        _require_root()
        state = self._current_state()
        if state.phase != "up":
            raise LabError(f"lab {self.settings.prefix!r} is not up (phase {state.phase})")
        self.topology.pod_netns(pod)  # range check

    def _ask(
        self, pod: int, message: control.Message, timeout: float, inbound: bool = False
    ) -> control.Message:
        self._ensure_app(pod, inbound)
        role = "client" if inbound else "app"
        return control.request(self.paths.control(pod, role), message, timeout)

    def _verify(
        self,
        pod: int,
        raw: Sequence[dict[str, str]],
        downstream: str,
        upstream: str,
        inbound: bool = False,
    ) -> list[ProxiedPair]:
        """Check with ss that the proxy holds each pair's sockets in the expected states.

        A dual-stack proxy's sockets show IPv4 peers as ``[::ffff:a.b.c.d]``:
        they are matched by their IPv4 spelling, and returned as the kernel
        holds them.
        """
        name = self.topology.pod_netns(pod)
        if inbound:
            local_port = self.inbound_local_port
            target = str(self.inbound_service(pod))
        else:
            local_port = self.settings.mesh.outbound_port
            target = str(SERVICE)
        deadline = time.monotonic() + VERIFY_TIMEOUT
        while True:
            views = ss.sockets(name)
            down = {
                _unmapped(v.peer): v
                for v in views
                if v.state == downstream and v.local_port == local_port
            }
            up = {
                _unmapped(v.local): v
                for v in views
                if v.state == upstream and _unmapped(v.peer) == target
            }
            missing = [p for p in raw if p["app"] not in down or p["upstream"] not in up]
            if not missing:
                break
            if time.monotonic() > deadline:
                first = missing[0]
                raise LabError(
                    f"{len(missing)} of {len(raw)} connections not as expected in {name} "
                    f"(proxy {downstream} + {upstream}); first: app {first['app']}, "
                    f"proxy upstream {first['upstream']}"
                )
            time.sleep(0.05)
        return [
            ProxiedPair(
                app=Endpoint.parse(p["app"]),
                proxy_downstream=Endpoint.parse(down[p["app"]].local),
                proxy_upstream=Endpoint.parse(p["upstream"]),
            )
            for p in raw
        ]

    def _current_state(self) -> LabState:
        if self._state is None:
            state = LabState.load(self.paths.state)
            if state is None:
                raise LabError(
                    f"no lab {self.settings.prefix!r}: run `halfclose lab up --prefix "
                    f"{self.settings.prefix}`"
                )
            self._adopt(state)
        assert self._state is not None
        return self._state

    def _adopt(self, state: LabState) -> None:
        """Take the recorded settings: the lab is what was built, not what we were told."""
        self._state = state
        if state.settings != self.settings:
            self.settings = dataclasses.replace(state.settings, run_dir=self.settings.run_dir)
            self.topology = _topology(self.settings)

    def _record(self, role: str, pod: int | None) -> ProcessRecord:
        record = self._current_state().find(role, pod)
        if record is None:
            where = "" if pod is None else f" of pod {pod}"
            raise LabError(f"lab {self.settings.prefix!r} has no {role}{where}")
        return record

    def _save(self) -> None:
        assert self._state is not None
        self._state.save(self.paths.state)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.paths.lock, os.O_CREAT | os.O_RDWR, 0o600)
        except FileNotFoundError:
            raise LabError(f"lab {self.settings.prefix!r} is gone") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _reap(self) -> None:
        for proc in self._children:
            if proc.stdout is not None:
                proc.stdout.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self._children.clear()


def _topology(settings: LabSettings) -> Topology:
    return Topology(settings.prefix, settings.pods, settings.mesh.node_proxy)


def _unmapped(text: str) -> str:
    """``[::ffff:192.0.2.10]:80`` -> ``192.0.2.10:80`` (ss's spelling of a mapped peer)."""
    if text.startswith("[::ffff:") and "." in text:
        host, _, port = text[1:].rpartition("]:")
        return f"{host[7:]}:{port}"
    return text


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, NAT rules): run it as root")


def _process_info(record: ProcessRecord) -> ProcessInfo:
    return ProcessInfo(
        role=record.role,
        pod=record.pod,
        pid=record.pid,
        alive=supervise.alive(record.pid, record.start_time),
        uid=_uid_of(record.pid),
    )


def _uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
