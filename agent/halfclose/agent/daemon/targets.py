"""Which pods of this node the agent works on, under which policy (pure).

Inputs are the raw objects of the three watches (policies, pods on this node,
namespaces); the output is one ``PodTarget`` per pod that a policy applies
to, after the overlap resolution of ``halfclose.api.selection``.  No I/O: the
unit tests feed it plain dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from halfclose.agent.core.cgroup import pod_container_ids
from halfclose.api.policy import Policy, PolicyError, parse_policy
from halfclose.api.selection import select_policy

log = logging.getLogger(__name__)

PodKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class PodTarget:
    namespace: str
    name: str
    uid: str
    policy: Policy
    container_ids: frozenset[str]
    # status.podIPs and status.hostIPs: how the default resolver (the runtime's
    # netns bind mounts, no hostPID) finds the pod, and which netns it refuses.
    pod_ips: frozenset[str] = frozenset()
    host_ips: frozenset[str] = frozenset()

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)


def parse_policies(objects: Iterable[Mapping[str, Any]]) -> list[Policy]:
    """Every valid policy; an invalid one is skipped (the operator reports it).

    The API server validated the schema already; what can still fail here is
    a rule only halfclose checks, or an object from a newer CRD version.
    """
    policies: list[Policy] = []
    for obj in objects:
        try:
            policies.append(parse_policy(obj))
        except PolicyError as exc:
            log.warning("ignoring policy: %s", exc)
    return policies


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def status_ips(status: Mapping[str, Any] | None, plural: str, singular: str) -> frozenset[str]:
    """``status.podIPs[*].ip`` (or hostIPs), else the older single-address field."""
    status = status or {}
    ips = {
        str(e.get("ip")) for e in status.get(plural) or () if isinstance(e, Mapping) and e.get("ip")
    }
    if not ips and status.get(singular):
        ips.add(str(status[singular]))
    return frozenset(ips)


def pod_is_scannable(pod: Mapping[str, Any], node: str) -> bool:
    """A running pod of this node with its own network namespace.

    hostNetwork pods share the node's netns: scanning it would judge every
    socket of the node under one pod's policy, so they are never targets.
    The node check repeats the server-side fieldSelector on purpose: a server
    that ignored it must not make this agent act on another node's pods.
    """
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    if spec.get("nodeName") != node or spec.get("hostNetwork"):
        return False
    return status.get("phase") in (None, "Pending", "Running")


def pod_targets(
    policies: Iterable[Policy],
    pods: Iterable[Mapping[str, Any]],
    namespace_labels: Mapping[str, Mapping[str, str]],
    node: str,
) -> dict[PodKey, PodTarget]:
    """The pods of ``node`` that some policy applies to, with that policy.

    ``namespace_labels`` maps namespace name -> labels; a namespace missing
    from it (not listed yet) is matched by name only, as
    ``namespace_in_scope`` does with unknown labels.
    """
    policy_list = list(policies)
    out: dict[PodKey, PodTarget] = {}
    if not policy_list:
        return out
    for pod in pods:
        if not pod_is_scannable(pod, node):
            continue
        meta = pod.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        ids = pod_container_ids(pod.get("status"))
        pod_ips = status_ips(pod.get("status"), "podIPs", "podIP")
        if not ids and not pod_ips:
            continue  # no container started, no address yet: nothing to resolve
        policy = select_policy(
            policy_list, namespace_labels.get(namespace), namespace, _labels(pod)
        )
        if policy is None:
            continue
        out[(namespace, name)] = PodTarget(
            namespace,
            name,
            str(meta.get("uid") or ""),
            policy,
            ids,
            pod_ips,
            status_ips(pod.get("status"), "hostIPs", "hostIP"),
        )
    return out
