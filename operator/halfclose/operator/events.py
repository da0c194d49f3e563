"""The Events the operator posts on policies, as ``kubectl describe hcp`` finds them.

A policy is cluster-scoped: its Events live in namespace ``default`` (where
Kubernetes files Events of cluster-scoped objects) and name the policy
without a namespace -- ``kubectl describe`` searches
``involvedObject.namespace=""``; kopf's events said ``default`` there and
were never shown.  Signed ``halfclose-operator`` (the "From" column).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from halfclose.api import format_time
from halfclose.operator.status import PolicyEvent

COMPONENT = "halfclose-operator"
EVENT_NAMESPACE = "default"
EVENTS_PATH = f"/api/v1/namespaces/{EVENT_NAMESPACE}/events"
_MAX_MESSAGE = 1024


def event_body(
    involved: Mapping[str, str], event: PolicyEvent, instance: str, now: dt.datetime
) -> dict[str, Any]:
    """A core/v1 Event (``kubectl describe`` reads core/v1 Events)."""
    message = event.message
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    stamp = format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{involved['name']}.", "namespace": EVENT_NAMESPACE},
        "involvedObject": dict(involved),
        "type": event.type,
        "reason": event.reason,
        "message": message,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
