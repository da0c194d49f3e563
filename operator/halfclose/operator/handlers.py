"""Wiring: kopf for the life cycle, the peering and the probes; our own list/watch for the rest.

How the operator works (docs/api.md, "The operator"):

- kopf logs in, runs start-up and clean-up, serves /healthz and keeps the
  peering (leader election) -- and has **no handler on any resource**: a kopf
  timer would put kopf's finalizer on every policy (a stopped operator then
  blocks ``kubectl delete`` and a CRD deletion for ever), and kopf's
  per-object workers for every pod and report made start-up quadratic in
  their number (issue 10);
- one informer (list, then watch) per kind feeds the inventory: namespaces'
  and running pods' metadata only, policies, reports, and the peering object;
  each object is decoded once per change and report counters are kept
  incrementally;
- one reconcile loop (``reconcile.Reconciler``) writes the statuses of the
  policies, at most once per ``debounce_seconds`` each, posts Events for
  condition transitions and deletes a deleted policy's reports -- on the
  leading replica only; standbys keep their inventory warm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
import kubernetes
from prometheus_client import CollectorRegistry

from halfclose.api import GROUP, POLICY_PLURAL, REPORT_PLURAL, VERSION
from halfclose.api.crds import PEERING_GROUP, PEERING_KIND, PEERING_PLURAL, PEERING_VERSION
from halfclose.metricsauth import MetricsAuth, api_client_post
from halfclose.operator.client import (
    METADATA_ONLY,
    METADATA_ONLY_WATCH,
    ApiError,
    KubeClient,
)
from halfclose.operator.http import ProbeServer
from halfclose.operator.informer import Informer, Key, WatchedKind
from halfclose.operator.inventory import Inventory
from halfclose.operator.kube import connection_info, load_configuration
from halfclose.operator.metrics import OperatorMetrics
from halfclose.operator.reconcile import Reconciler, count_report
from halfclose.operator.settings import OperatorSettings

log = logging.getLogger("halfclose.operator")

# Finished pods cannot hold proxy sockets; the server leaves them out (and
# sends a deletion when a pod finishes).
RUNNING_PODS = "status.phase!=Succeeded,status.phase!=Failed"


def new_identity() -> str:
    """This replica's name in the peering object (kopf's, passed to kopf.run)."""
    return f"{socket.gethostname()}/{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class OperatorState:
    """What one operator (one event loop) holds."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    identity: str = field(default_factory=new_identity)
    inventory: Inventory = field(default_factory=Inventory)
    client: KubeClient | None = None
    reconciler: Reconciler | None = None
    informers: list[Informer] = field(default_factory=list)
    probes: ProbeServer | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def readiness(self) -> Mapping[str, bool]:
        return self.reconciler.readiness if self.reconciler else {}


def watched_kinds(settings: OperatorSettings) -> list[tuple[WatchedKind, str]]:
    """Every list/watch the operator runs, with the inventory sink it feeds."""
    kinds = [
        (
            WatchedKind(
                "namespaces", "/api/v1/namespaces", None, METADATA_ONLY, METADATA_ONLY_WATCH
            ),
            "on_namespace",
        ),
        (
            WatchedKind("pods", "/api/v1/pods", RUNNING_PODS, METADATA_ONLY, METADATA_ONLY_WATCH),
            "on_pod",
        ),
        (WatchedKind("policies", f"/apis/{GROUP}/{VERSION}/{POLICY_PLURAL}"), "on_policy"),
        (WatchedKind("reports", f"/apis/{GROUP}/{VERSION}/{REPORT_PLURAL}"), "on_report"),
    ]
    if settings.peering is not None:
        kinds.append(
            (
                WatchedKind(
                    "peering",
                    f"/apis/{PEERING_GROUP}/{PEERING_VERSION}/{PEERING_PLURAL}",
                    f"metadata.name={settings.peering}",
                ),
                "on_peering",
            )
        )
    return kinds


async def ensure_peering(client: KubeClient, name: str) -> bool:
    """Create the ClusterKopfPeering object replicas meet in; True if created.

    kopf needs the object to exist (it only patches it): without it every
    replica would believe it is alone and all would act.
    """
    body = {
        "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
        "kind": PEERING_KIND,
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "halfclose"}},
    }
    try:
        await client.request(
            "POST", f"/apis/{PEERING_GROUP}/{PEERING_VERSION}/{PEERING_PLURAL}", body=body
        )
    except ApiError as exc:
        if exc.status == 409:
            return False
        raise
    return True


def build_operator(
    settings: OperatorSettings, *, metrics_registry: CollectorRegistry | None = None
) -> tuple[kopf.OperatorRegistry, OperatorState]:
    """A kopf registry (life cycle only) and the state the operator runs on.

    ``halfclose.operator.main`` runs it with ``run``; tests too (in a thread).
    """
    registry = kopf.OperatorRegistry()
    state = OperatorState(settings, OperatorMetrics(metrics_registry or CollectorRegistry()))
    config: list[kubernetes.client.Configuration] = []

    async def configuration() -> kubernetes.client.Configuration:
        # One configuration for kopf's login and our own client (loaded on first use).
        if not config:
            config.append(await asyncio.to_thread(load_configuration, settings.kubeconfig))
        return config[0]

    @kopf.on.login(id="login", registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(await configuration())

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf posts nothing (our Events are our own) and watches no CRDs.
        settings.posting.enabled = False
        settings.scanning.disabled = True
        settings.peering.stealth = True
        client = state.client = KubeClient(await configuration())
        peering = state.settings.peering
        if peering and not settings.peering.standalone and await ensure_peering(client, peering):
            log.info("created %s %r", PEERING_KIND, state.settings.peering)
        auth = None
        if state.settings.metrics_auth:
            api = kubernetes.client.ApiClient(await configuration())
            auth = MetricsAuth(api_client_post(api), state.settings.metrics_auth_cache_seconds)
        state.probes = ProbeServer(
            state.metrics, state.settings.metrics_host, state.settings.metrics_port, auth=auth
        )
        await state.probes.start()
        _start(state, client)
        state.probes.ready = True
        log.info("metrics and /readyz on port %s", state.probes.port)

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        state.tasks.clear()
        if state.probes is not None:
            await state.probes.stop()
        if state.client is not None:
            await state.client.close()

    @kopf.on.probe(id="policies", registry=registry)
    def probe_policies(**_: Any) -> int:
        return len(state.readiness)

    return registry, state


def _start(state: OperatorState, client: KubeClient) -> None:
    inventory, metrics = state.inventory, state.metrics

    async def all_listed() -> None:
        await asyncio.gather(*(i.synced.wait() for i in state.informers))

    reconciler = state.reconciler = Reconciler(
        settings=state.settings,
        inventory=inventory,
        client=client,
        metrics=metrics,
        identity=state.identity,
        ready=all_listed,
    )

    def sink_for(method: str) -> Callable[[Key, Mapping[str, Any] | None], None]:
        feed = getattr(inventory, method)

        def sink(key: Key, obj: Mapping[str, Any] | None) -> None:
            result = feed(key, obj)
            if method == "on_report":
                count_report(metrics, result)
                metrics.reports.set(len(inventory.reports))
            reconciler.notify()

        return sink

    for kind, method in watched_kinds(state.settings):
        state.informers.append(Informer(client, kind, sink_for(method)))
    loop = asyncio.get_running_loop()
    for informer in state.informers:
        state.tasks.append(loop.create_task(informer.run(), name=f"watch {informer.kind.name}"))
    state.tasks.append(loop.create_task(_guarded(reconciler.run), name="reconcile"))


async def _guarded(run: Callable[[], Any]) -> None:
    """A bug in a pass must not leave a running operator that writes nothing."""
    while True:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the reconcile loop failed; restarting it in 1s")
            await asyncio.sleep(1)


def run(
    registry: kopf.OperatorRegistry,
    state: OperatorState,
    *,
    liveness_endpoint: str | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    """Run the operator until SIGTERM (or ``stop_flag``), cluster-wide."""
    kopf.run(
        registry=registry,
        settings=kopf.OperatorSettings(),
        clusterwide=True,
        standalone=state.settings.peering is None,
        peering_name=state.settings.peering,
        priority=state.settings.priority,
        identity=state.identity,  # type: ignore[arg-type]  # kopf's NewType over str
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
