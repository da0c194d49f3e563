"""The agent's view of the cluster: policies, the pods of its node, namespaces.

Three reflectors (list+watch each).  Pods are watched with the server-side
field selector ``spec.nodeName=<node>``: an agent on every node of a large
cluster must never list every pod of the cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from halfclose.agent.kube.client import RawClient
from halfclose.agent.kube.watch import Reflector

from halfclose.api.names import GROUP, POLICY_PLURAL, VERSION


class KubeWorld:
    def __init__(self, client: RawClient, node: str, on_change: Callable[[], None]) -> None:
        self.node = node
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

    def synced(self) -> bool:
        """Policies and pods listed at least once (readiness; safe to restore sysctls)."""
        return self.policy_watch.synced.is_set() and self.pod_watch.synced.is_set()
