"""Which policy applies to a pod: matching and overlap resolution.

A pod is *matched* by a policy when its namespace is in the policy's scope
and its labels satisfy the pod selector:

- scope = the namespaces named in ``spec.namespaces``, plus the namespaces
  whose labels match ``spec.namespaceSelector`` -- except kube-system, which a
  selector never reaches (it must be named);
- an absent ``podSelector`` matches every pod; ``{}`` does too.

When several policies match one pod, exactly one *applies*: the oldest
(smallest ``metadata.creationTimestamp``), then the smallest name.  Oldest
wins so that creating a policy never changes what an existing one does to
pods it already covers; the name breaks ties within the timestamp's one-second
resolution.  The operator reports the overlap as condition Overlapping on both
policies (docs/api.md).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

from halfclose.api.names import EXPLICIT_ONLY_NAMESPACES
from halfclose.api.policy import Policy

# Policies without a creation time (parsed from a file) sort after every real one.
_NEVER = dt.datetime.max.replace(tzinfo=dt.UTC)


def namespace_in_scope(
    policy: Policy, namespace: str, namespace_labels: Mapping[str, str] | None
) -> bool:
    """Whether ``namespace`` is in the policy's scope (see the module doc).

    ``namespace_labels`` may be None when unknown; then only the names count.
    """
    spec = policy.spec
    if namespace in spec.namespaces:
        return True
    if spec.namespace_selector is None or namespace in EXPLICIT_ONLY_NAMESPACES:
        return False
    return namespace_labels is not None and spec.namespace_selector.matches(namespace_labels)


def policy_matches(
    policy: Policy,
    namespace_labels: Mapping[str, str] | None,
    pod_namespace: str,
    pod_labels: Mapping[str, str],
) -> bool:
    """Whether the policy selects the pod (before overlap resolution)."""
    if not namespace_in_scope(policy, pod_namespace, namespace_labels):
        return False
    selector = policy.spec.pod_selector
    return selector is None or selector.matches(pod_labels)


def precedence_key(policy: Policy) -> tuple[dt.datetime, str]:
    """Sort key: the first policy in this order wins an overlap."""
    return (policy.creation_timestamp or _NEVER, policy.name)


def select_policy(
    policies: Iterable[Policy],
    namespace_labels: Mapping[str, str] | None,
    pod_namespace: str,
    pod_labels: Mapping[str, str],
) -> Policy | None:
    """The one policy that applies to the pod, or None."""
    matching = [
        p for p in policies if policy_matches(p, namespace_labels, pod_namespace, pod_labels)
    ]
    return min(matching, key=precedence_key, default=None)
