"""``halfclose-agent``: the node agent's entry point (the composition root).

The environment is read here and nowhere else (``AgentSettings.from_env``);
everything below receives typed settings.  SIGTERM/SIGINT stop the loop, let
buffered report writes drain for a few seconds, and exit 0.

Privilege separation (issue 13): ``main`` first forks the kernel worker
(``daemon.worker``: it keeps the capabilities, holds every netns and netlink
socket, has no listener and no API credentials), then drops every capability
of this process, and only then creates the Kubernetes client and the HTTP
server.  The code that parses what comes from the network runs with none.
``Daemon.build`` without a ``kernel`` (tests, in-process) keeps it all in one
process.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from halfclose.agent.daemon.http import HealthServer
from halfclose.agent.daemon.kernel import LocalKernel
from halfclose.agent.daemon.loop import Agent
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.ports import Kernel
from halfclose.agent.daemon.remediate import EngineRemediator
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.daemon.worker import WorkerKernel, start_kernel_worker
from halfclose.agent.kernel.mountns import MountedNetnsResolver
from halfclose.agent.kernel.netns import require_root
from halfclose.agent.kernel.podnetns import PodNetnsResolver, PodNetnsSource
from halfclose.agent.kernel.privsep import drop_capabilities
from halfclose.agent.kube.client import RawClient, load_api_client
from halfclose.agent.kube.world import KubeWorld
from halfclose.agent.kube.writer import ReportWriter
from halfclose.errors import UserError
from halfclose.metricsauth import MetricsAuth, Post

log = logging.getLogger("halfclose.agent")


def pod_netns_source(settings: AgentSettings) -> PodNetnsSource:
    """The runtime's bind mounts by pod IP (the chart's default), or host PIDs (hostPID)."""
    if settings.netns_dir is not None:
        return MountedNetnsResolver(settings.netns_dir)
    return PodNetnsResolver(settings.host_proc)


def local_kernel(settings: AgentSettings) -> LocalKernel:
    """The kernel side in this process (in the worker, or in-process for tests)."""
    return LocalKernel(
        EngineRemediator(settings.state_dir, settings.sysctl_root, netns_dir=settings.netns_dir),
        pod_netns_source(settings),
        settings.host_proc,
    )


def privileged_kernel(settings: AgentSettings) -> WorkerKernel:
    """Fork the kernel worker, then drop every capability of this process."""
    kernel = start_kernel_worker(lambda: local_kernel(settings))
    try:
        drop_capabilities()
    except OSError as exc:
        kernel.close()
        raise UserError(
            f"cannot drop capabilities after forking the kernel worker: {exc}"
        ) from None
    return kernel


def client_post(client: RawClient) -> Post:
    """The reviews' ``POST`` over the agent's own API client."""

    def post(path: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        return client.request("POST", path, body=dict(body))

    return post


def metrics_auth(settings: AgentSettings, client: RawClient) -> MetricsAuth | None:
    if not settings.metrics_auth:
        return None
    return MetricsAuth(client_post(client), settings.metrics_auth_cache_seconds)


@dataclass
class Daemon:
    """Every long-lived part of a running agent, wired together."""

    settings: AgentSettings
    registry: CollectorRegistry
    metrics: AgentMetrics
    world: KubeWorld
    writer: ReportWriter
    agent: Agent
    http: HealthServer

    @classmethod
    def build(
        cls,
        settings: AgentSettings,
        registry: CollectorRegistry | None = None,
        kernel: Kernel | None = None,
    ) -> Daemon:
        registry = registry or CollectorRegistry()
        metrics = AgentMetrics(registry, settings.node_name)
        try:
            api = load_api_client(settings.kubeconfig)
        except Exception as exc:
            raise UserError(f"cannot load Kubernetes client configuration: {exc}") from None
        client = RawClient(api)
        writer = ReportWriter(client, settings.node_name, on_pending=metrics.pending_reports.set)
        holder: list[Agent] = []
        world = KubeWorld(
            client, settings.node_name, lambda: holder[0].notify() if holder else None
        )
        agent = Agent(
            settings,
            metrics,
            world,
            writer,
            kernel if kernel is not None else local_kernel(settings),
        )
        holder.append(agent)
        http = HealthServer(
            settings.metrics_host,
            settings.metrics_port,
            registry,
            healthy=agent.healthy,
            ready=world.synced,
            auth=metrics_auth(settings, client),
        )
        return cls(settings, registry, metrics, world, writer, agent, http)

    def start(self) -> None:
        """Start the helper threads (HTTP, writer, watches); the loop is ``run``'s."""
        self.http.start()
        self.writer.start()
        self.world.start()

    def run(self) -> None:
        """Run the agent loop on the calling thread until ``stop``."""
        try:
            self.agent.run()
        finally:
            self.world.stop()
            self.writer.stop(self.settings.shutdown_flush_seconds)
            self.http.stop()

    def stop(self) -> None:
        self.agent.stop()


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # configured by environment only, as a DaemonSet container is
    try:
        settings = AgentSettings.from_env()
        logging.basicConfig(
            level=settings.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        require_root()
        kernel = privileged_kernel(settings)
        daemon = Daemon.build(settings, kernel=kernel)
        try:
            daemon.start()
        except OSError as exc:
            raise UserError(
                f"cannot serve metrics on port {settings.metrics_port}: {exc}"
            ) from None
    except UserError as exc:
        print(f"halfclose-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        daemon.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info(
        "halfclose-agent on node %s, metrics on :%d, kernel worker pid %d",
        settings.node_name,
        daemon.http.port,
        kernel.client.pid,
    )
    try:
        daemon.run()
    finally:
        kernel.close()  # the worker sees its socket close and exits
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
