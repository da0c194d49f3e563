"""HalfClosePolicy: which pods to watch, and what to do about leaked sockets.

The dataclasses below are the source of truth for the CRD
(``crds/halfclosepolicies.halfclose.io.yaml`` is generated from them) and
the typed object the agent and the operator work with (``parse_policy``).
Every default, bound and rule is documented in docs/api.md.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from halfclose.api.conditions import Condition
from halfclose.api.names import API_VERSION, POLICY_KIND
from halfclose.api.schema import (
    Constraints,
    Rule,
    SchemaError,
    api_object,
    decode,
    parse_time,
    prop,
)
from halfclose.api.selectors import LabelSelector, selector_problems
from halfclose.errors import UserError

Action = Literal["Report", "KillSockets", "PatchConntrack"]
ConntrackStrategy = Literal["PerEntry", "Sysctl"]

REPORT: Action = "Report"
KILL_SOCKETS: Action = "KillSockets"
PATCH_CONNTRACK: Action = "PatchConntrack"

# With strategy Sysctl every CLOSE_WAIT entry in the pod lives this long, not
# just the proxy's: a cap keeps the conntrack table from filling
# (kubernetes#97377 is what raising it everywhere does).
SYSCTL_MAX_CLOSE_WAIT_SECONDS = 3600
TOP_PODS = 5

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class PolicyError(UserError, ValueError):
    """A HalfClosePolicy the API server or halfclose would reject.

    The message names the field (``spec.thresholds.minIdleSeconds: ...``).
    """


@api_object("Limits that decide when a finding is acted on or alerted on.")
@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    min_idle_seconds: int = prop(
        "A leaked socket is acted on only after the peer has been silent this long"
        " (tcp_info last ACK/data received). The NAT entry's own 60 s countdown has"
        " usually passed already; this guards against acting on a connection that"
        " just changed state.",
        default=60,
        minimum=0,
        maximum=86400,
    )
    max_kills_per_minute: int = prop(
        "At most this many sockets destroyed per node per minute; the rest wait for"
        " the next scan. A brake against a misclassification turning into an outage.",
        default=600,
        minimum=1,
        maximum=100000,
    )
    leaked_per_pod_alert: int = prop(
        "A pod's report gets condition Leaking=True when it has at least this many leaked sockets.",
        default=10,
        minimum=1,
        maximum=1000000,
    )


def _sysctl_cap(conntrack: Mapping[str, Any]) -> bool:
    return (
        conntrack.get("strategy") != "Sysctl"
        or conntrack.get("closeWaitTimeoutSeconds", 0) <= SYSCTL_MAX_CLOSE_WAIT_SECONDS
    )


@api_object(
    "How action PatchConntrack keeps a half-closed connection's NAT entry alive.",
    rules=(
        Rule(
            cel=f"self.strategy != 'Sysctl' || self.closeWaitTimeoutSeconds <= "
            f"{SYSCTL_MAX_CLOSE_WAIT_SECONDS}",
            message=f"with strategy Sysctl every CLOSE_WAIT entry of the pod lives that long, so"
            f" closeWaitTimeoutSeconds must be at most {SYSCTL_MAX_CLOSE_WAIT_SECONDS}",
            check=_sysctl_cap,
            field_path=".closeWaitTimeoutSeconds",
        ),
    ),
)
@dataclass(frozen=True, slots=True, kw_only=True)
class ConntrackSettings:
    strategy: ConntrackStrategy = prop(
        "PerEntry: give only the at-risk proxy connections' entries a fixed longer"
        " timeout. Sysctl: raise nf_conntrack_tcp_timeout_close_wait in the pod's network"
        " namespace (that pod only; restored when the policy stops applying).",
        default="PerEntry",
    )
    close_wait_timeout_seconds: int = prop(
        "The CLOSE_WAIT lifetime to give. It should outlast the app's slowest close;"
        " Envoy's idle timeout (3600 s) bounds how long a leak could last anyway.",
        default=3600,
        minimum=120,
        maximum=86400,
    )


def _has_scope(spec: Mapping[str, Any]) -> bool:
    return len(spec.get("namespaces") or []) > 0 or "namespaceSelector" in spec


def _conntrack_only_with_patch(spec: Mapping[str, Any]) -> bool:
    return "conntrack" not in spec or spec.get("action") == PATCH_CONNTRACK


@api_object(
    "Which pods the policy applies to and what the node agent does about their"
    " half-closed proxy sockets.",
    rules=(
        Rule(
            cel="(has(self.namespaces) && size(self.namespaces) > 0) ||"
            " has(self.namespaceSelector)",
            message="set namespaces, namespaceSelector or both (namespaceSelector: {} selects"
            " every namespace except kube-system)",
            check=_has_scope,
            reason="FieldValueRequired",
        ),
        Rule(
            cel="!has(self.conntrack) || self.action == 'PatchConntrack'",
            message="conntrack settings apply only to action PatchConntrack",
            check=_conntrack_only_with_patch,
            field_path=".conntrack",
            reason="FieldValueForbidden",
        ),
    ),
)
@dataclass(frozen=True, slots=True, kw_only=True)
class PolicySpec:
    namespaces: tuple[str, ...] = prop(
        "Namespaces the policy applies to, by name. The only way to include kube-system.",
        default=(),
        max_items=256,
        list_type="set",
        items=Constraints(max_length=63, pattern=_DNS_LABEL),
    )
    namespace_selector: LabelSelector | None = prop(
        "Namespaces the policy applies to, by label ({} = all but kube-system). Adds to"
        " namespaces.",
        default=None,
    )
    pod_selector: LabelSelector | None = prop(
        "Pods within those namespaces the policy applies to; absent = every pod.",
        default=None,
    )
    capture_ports: tuple[int, ...] = prop(
        "The proxy's capture ports (e.g. 15001, 15006). Empty = detect each pod's from its"
        " REDIRECT/TPROXY NAT rules.",
        default=(),
        max_items=32,
        list_type="set",
        items=Constraints(minimum=1, maximum=65535),
    )
    thresholds: Thresholds = prop(
        "When to act and when to alert.",
        default_factory=Thresholds,
        object_default=True,
    )
    action: Action = prop(
        "Report: only report. KillSockets: destroy leaked proxy sockets (SOCK_DESTROY)."
        " PatchConntrack: keep NAT entries alive so the leak never forms.",
        default=REPORT,
    )
    conntrack: ConntrackSettings = prop(
        "Settings for action PatchConntrack (allowed only with it).",
        default_factory=ConntrackSettings,
    )
    scan_interval_seconds: int = prop(
        "Seconds between scans of each pod's network namespace.",
        default=15,
        minimum=1,
        maximum=3600,
    )
    dry_run: bool = prop(
        "Decide but do not act: findings show what the action would have done.",
        default=False,
    )


@api_object("A pod with findings, as summarised in the policy's status.", emit_defaults=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopPod:
    namespace: str = prop("The pod's namespace.", required=True)
    pod: str = prop("The pod's name.", required=True)
    node: str = prop("The node the pod runs on.", default="")
    leaked: int = prop("Leaked sockets now.", default=0, minimum=0)
    at_risk: int = prop("At-risk sockets now.", default=0, minimum=0)
    killed_total: int = prop("Sockets destroyed so far.", default=0, minimum=0)


@api_object(
    "What the operator observed: conditions and the aggregate of the policy's reports.",
    emit_defaults=False,
)
@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyStatus:
    observed_generation: int | None = prop(
        "The .metadata.generation this status was computed from.",
        default=None,
        minimum=0,
    )
    conditions: tuple[Condition, ...] = prop(
        "Accepted, Ready and Overlapping.",
        default=(),
        max_items=8,
        list_type="map",
        list_map_keys=("type",),
    )
    matched_namespaces: int = prop(
        "Existing namespaces in the policy's scope.",
        default=0,
        minimum=0,
    )
    matched_pods: int = prop(
        "Pods the policy applies to (after overlap resolution).",
        default=0,
        minimum=0,
    )
    pods_with_findings: int = prop(
        "Pods whose report has leaked or at-risk sockets now.",
        default=0,
        minimum=0,
    )
    leaked_now: int = prop("Leaked sockets now, over all reports.", default=0, minimum=0)
    at_risk_now: int = prop("At-risk sockets now, over all reports.", default=0, minimum=0)
    killed_total: int = prop(
        "Sockets destroyed, summed over the reports that exist.",
        default=0,
        minimum=0,
    )
    extended_total: int = prop(
        "Conntrack entries extended, summed over the reports that exist.",
        default=0,
        minimum=0,
    )
    nodes_reporting: int = prop("Distinct nodes with reports.", default=0, minimum=0)
    top_pods: tuple[TopPod, ...] = prop(
        f"Up to {TOP_PODS} pods with the most leaked sockets (then most killed).",
        default=(),
        max_items=TOP_PODS,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """A parsed HalfClosePolicy: its identity and its spec with defaults applied."""

    name: str
    spec: PolicySpec
    uid: str = ""
    generation: int = 0
    creation_timestamp: dt.datetime | None = None
    status: PolicyStatus = field(default_factory=PolicyStatus)


def parse_policy(obj: Mapping[str, Any], *, strict: bool = False) -> Policy:
    """Build a ``Policy`` from a HalfClosePolicy object (API JSON or a YAML file).

    Applies the schema's defaults and checks everything the CRD checks (types,
    enums, bounds, CEL rules) plus what it cannot (label key syntax), so code
    that holds a ``Policy`` never meets an invalid one.  ``strict`` also
    rejects unknown fields (a typo in a file); the API server prunes those, so
    objects read from the API need not be strict.

    Raises ``PolicyError`` (a ``UserError``) with the offending field path.
    """
    if not isinstance(obj, Mapping):
        raise PolicyError("a HalfClosePolicy must be an object")
    kind = obj.get("kind", POLICY_KIND)
    api_version = obj.get("apiVersion", API_VERSION)
    if kind != POLICY_KIND or api_version != API_VERSION:
        raise PolicyError(
            f"expected apiVersion {API_VERSION} kind {POLICY_KIND}, got {api_version} {kind}"
        )
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError("metadata.name: required value")
    where = f"HalfClosePolicy {name!r}"
    if "spec" not in obj:
        raise PolicyError(f"{where}: spec: required value")
    try:
        spec = decode(PolicySpec, obj["spec"], "spec", strict=strict)
    except SchemaError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    try:
        status = decode(PolicyStatus, obj.get("status") or {}, "status")
    except SchemaError:
        # Status is the operator's, not the user's: one this version cannot
        # read (written by a newer operator, say) must not void a valid spec.
        status = PolicyStatus()
    problems = [
        *(
            selector_problems(spec.namespace_selector, "spec.namespaceSelector")
            if spec.namespace_selector
            else []
        ),
        *(selector_problems(spec.pod_selector, "spec.podSelector") if spec.pod_selector else []),
    ]
    if problems:
        raise PolicyError(f"{where}: {problems[0]}")
    try:
        creation_timestamp = _timestamp(meta.get("creationTimestamp"))
    except ValueError:
        raise PolicyError(f"{where}: metadata.creationTimestamp: not a date-time") from None
    return Policy(
        name=name,
        uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 0),
        creation_timestamp=creation_timestamp,
        spec=spec,
        status=status,
    )


def _timestamp(value: object) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        # PyYAML turns an unquoted timestamp into a naive UTC datetime.
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return parse_time(str(value))
