"""Which policy applies to each pod, computed for the whole cluster at once.

The same rule as ``halfclose.api.select_policy`` (the agent's, per pod) --
oldest policy wins, then name -- applied to every known pod, recording for
each policy what it applies to, what it shares and with whom.  Only valid
policies take part: an invalid one applies to nothing and claims nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from halfclose.api import Policy, namespace_in_scope, policy_matches, precedence_key
from halfclose.operator.view import PodInfo


@dataclass(slots=True)
class PolicyMatch:
    """What one policy selects and applies to."""

    namespaces_in_scope: int = 0
    missing_namespaces: tuple[str, ...] = ()  # named in spec.namespaces, absent
    pods_in_scope: int = 0  # pods in the scope's namespaces, before the pod selector
    selected: int = 0  # pods matching namespaces + podSelector, before overlaps
    applied: int = 0  # pods this policy applies to (overlaps won)
    claimed_by: Counter[str] = field(default_factory=Counter)  # older policy -> pods lost
    shares_with: Counter[str] = field(default_factory=Counter)  # newer policy -> pods won


@dataclass(frozen=True, slots=True)
class Assignment:
    matches: Mapping[str, PolicyMatch]

    def of(self, policy: str) -> PolicyMatch:
        return self.matches.get(policy) or PolicyMatch()


def assign(
    policies: Iterable[Policy],
    namespaces: Mapping[str, Mapping[str, str]],
    pods: Iterable[PodInfo],
) -> Assignment:
    """Resolve every pod to at most one policy.

    ``namespaces`` maps each existing namespace to its labels.  Cost is
    O(pods x policies in scope of the pod's namespace).
    """
    ordered = sorted(policies, key=precedence_key)
    matches = {p.name: PolicyMatch() for p in ordered}
    in_scope: dict[str, list[Policy]] = {}
    for ns, labels in namespaces.items():
        in_scope[ns] = [p for p in ordered if namespace_in_scope(p, ns, labels)]
        for p in in_scope[ns]:
            matches[p.name].namespaces_in_scope += 1
    for p in ordered:
        matches[p.name].missing_namespaces = tuple(
            sorted(ns for ns in p.spec.namespaces if ns not in namespaces)
        )
    for pod in pods:
        candidates = in_scope.get(pod.namespace)
        if not candidates:
            continue  # also pods of namespaces not (yet) known
        labels = namespaces[pod.namespace]
        selecting = []
        for p in candidates:
            matches[p.name].pods_in_scope += 1
            if policy_matches(p, labels, pod.namespace, pod.labels):
                selecting.append(p)
        if not selecting:
            continue
        winner, *losers = selecting  # candidates are in precedence order
        matches[winner.name].selected += 1
        matches[winner.name].applied += 1
        for loser in losers:
            matches[loser.name].selected += 1
            matches[loser.name].claimed_by[winner.name] += 1
            matches[winner.name].shares_with[loser.name] += 1
    return Assignment(matches)
