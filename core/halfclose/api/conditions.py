"""Status conditions (the metav1.Condition shape) and the names halfclose uses.

Conditions keep their ``lastTransitionTime`` while their status stays the
same, so recomputing a status from scratch (after an operator restart, say)
yields the same object and no write.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from halfclose.api.schema import api_object, format_time, prop

ConditionStatus = Literal["True", "False", "Unknown"]

# HalfClosePolicy condition types.
ACCEPTED = "Accepted"  # the spec is valid beyond what the schema can check
READY = "Ready"  # accepted and applies to at least one running pod
OVERLAPPING = "Overlapping"  # shares pods with another policy (see docs/api.md)

# HalfCloseReport condition type.
LEAKING = "Leaking"  # leaked sockets at or above thresholds.leakedPerPodAlert


@api_object(
    "One aspect of the object's state, in the shape of metav1.Condition.",
    emit_defaults=False,
)
@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    type: str = prop(
        "Condition type, e.g. Accepted, Ready, Overlapping, Leaking.",
        required=True,
        max_length=316,
    )
    status: ConditionStatus = prop("True, False or Unknown.", required=True)
    reason: str = prop(
        "A CamelCase word saying why the condition has its status.",
        required=True,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
    )
    message: str = prop("A sentence for people.", default="", max_length=32768)
    last_transition_time: str = prop(
        "When the status last changed.",
        required=True,
        format="date-time",
    )
    observed_generation: int | None = prop(
        "The .metadata.generation the condition was computed from.",
        default=None,
        minimum=0,
    )


def find_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Iterable[Condition], type_: str) -> bool:
    found = find_condition(conditions, type_)
    return found is not None and found.status == "True"


def set_condition(
    conditions: Sequence[Condition],
    *,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: dt.datetime,
    observed_generation: int | None = None,
) -> tuple[Condition, ...]:
    """Return ``conditions`` with ``type_`` set; order is kept, new types go last.

    ``lastTransitionTime`` moves only when the status changes: a reason or
    message update is not a transition.
    """
    previous = find_condition(conditions, type_)
    if previous is not None and previous.status == status:
        updated = replace(
            previous, reason=reason, message=message, observed_generation=observed_generation
        )
    else:
        updated = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=format_time(now),
            observed_generation=observed_generation,
        )
    if previous is None:
        return (*conditions, updated)
    return tuple(updated if c.type == type_ else c for c in conditions)


@dataclass(frozen=True, slots=True)
class ConditionChange:
    """A condition that appeared or changed status or reason: worth an Event."""

    condition: Condition
    previous: Condition | None


def condition_changes(
    before: Iterable[Condition], after: Iterable[Condition]
) -> list[ConditionChange]:
    """Conditions in ``after`` whose status or reason differ from ``before``.

    Message-only changes (a pod count moving) are not reported: Events are
    for transitions, not for every status write.
    """
    old = {c.type: c for c in before}
    changes = []
    for cond in after:
        prev = old.get(cond.type)
        if prev is None or (prev.status, prev.reason) != (cond.status, cond.reason):
            changes.append(ConditionChange(cond, prev))
    return changes
