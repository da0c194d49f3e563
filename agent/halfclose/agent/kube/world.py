"""The agent's view of the cluster: policies, the pods of its node, namespaces.

Three reflectors (list+watch each).  Pods are watched with the server-side
field selector ``spec.nodeName=<node>``: an agent on every node of a large
cluster must never list every pod of the cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from halfclose.agent.kube.client import ApiError, RawClient
from halfclose.agent.kube.watch import Reflector, object_key
from halfclose.api.names import GROUP, NODE_LABEL, POLICY_PLURAL, REPORT_PLURAL, VERSION

log = logging.getLogger(__name__)


class KubeWorld:
    def __init__(self, client: RawClient, node: str, on_change: Callable[[], None]) -> None:
        self.node = node
        self.client = client
        self._reports: dict[tuple[str, str], Mapping[str, Any]] | None = None
        self.policy_watch = Reflector(
            client, f"/apis/{GROUP}/{VERSION}/{POLICY_PLURAL}", "policies", on_change
        )
        self.pod_watch = Reflector(
            client,
            "/api/v1/pods",
            "pods",
            on_change,
            query={"fieldSelector": f"spec.nodeName={node}"},
        )
        self.namespace_watch = Reflector(client, "/api/v1/namespaces", "namespaces", on_change)
        self._all = (self.policy_watch, self.pod_watch, self.namespace_watch)

    def start(self) -> None:
        for reflector in self._all:
            reflector.start()

    def stop(self) -> None:
        for reflector in self._all:
            reflector.stop()

    def policies(self) -> list[Mapping[str, Any]]:
        return list(self.policy_watch.items().values())

    def pods(self) -> list[Mapping[str, Any]]:
        return list(self.pod_watch.items().values())

    def namespace_labels(self) -> dict[str, Mapping[str, str]]:
        return {
            name: (obj.get("metadata") or {}).get("labels") or {}
            for (_ns, name), obj in self.namespace_watch.items().items()
        }

    def previous_report(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The report this node's agent left before a restart (listed once, lazily).

        Seeds a pod's totals (killedTotal, extendedTotal) so a restart does not
        reset them.  Unreachable API: None (the totals restart; nothing worse).
        """
        if self._reports is None:
            try:
                body = self.client.get(
                    f"/apis/{GROUP}/{VERSION}/{REPORT_PLURAL}",
                    {"labelSelector": f"{NODE_LABEL}={self.node}"},
                )
            except ApiError as exc:
                log.info("cannot list previous reports: %s", exc)
                return None
            self._reports = {object_key(obj): obj for obj in body.get("items") or ()}
        return self._reports.get((namespace, name))

    def synced(self) -> bool:
        """Policies and pods listed at least once (readiness; safe to restore sysctls)."""
        return bool(self.policy_watch.synced.is_set() and self.pod_watch.synced.is_set())
