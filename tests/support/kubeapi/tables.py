"""Server-side printing: ``meta.k8s.io/v1`` Table responses for ``kubectl get``.

kubectl asks for ``Accept: application/json;as=Table;v=v1;g=meta.k8s.io`` and prints
whatever columns the server sends, so the CRD's ``additionalPrinterColumns`` are
rendered here the way apiextensions-apiserver's table convertor does: a Name column
first, then each column's JSONPath; ``string`` cells are Go-formatted (``[a b]`` for a
list), typed cells keep their value only when the type matches, ``date`` cells become
ages (``5m``, ``3h2m``) with apimachinery's ``HumanDuration`` rules.  A CRD without
columns gets an Age column.  A few built-in kinds have their kubectl columns.
"""

from __future__ import annotations

import datetime
import decimal
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import jsonpath
from .resources import ResourceType

NAME_COLUMN: dict[str, Any] = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name must be unique within a namespace. Is required when creating resources, "
    "although some resources may allow a client to request the generation of an appropriate name "
    "automatically. Name is primarily intended for creation idempotence and configuration "
    "definition. Cannot be updated.",
    "priority": 0,
}
AGE_COLUMN: dict[str, Any] = {
    "name": "Age",
    "type": "date",
    "format": "",
    "description": "CreationTimestamp is a timestamp representing the server time when this object "
    "was created.",
    "priority": 0,
    "jsonPath": ".metadata.creationTimestamp",
}


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rem = s % 60
        return f"{minutes}m" if rem == 0 else f"{minutes}m{rem}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rem = minutes % 60
        return f"{hours}h" if rem == 0 else f"{hours}h{rem}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rem = hours % 24
        return f"{hours // 24}d" if rem == 0 else f"{hours // 24}d{rem}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rem = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if rem == 0 else f"{hours // 24 // 365}y{rem}d"
    return f"{hours // 24 // 365}y"


def go_format(value: Any) -> str:
    """Go's ``fmt.Sprint`` of a decoded JSON value, as jsonpath printing uses it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "<nil>"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, list):
        return "[" + " ".join(go_format(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_format(value[k])}" for k in sorted(value)) + "]"
    return str(value)


def _go_float(value: float) -> str:
    """strconv 'g' with the shortest precision: exponent form below 1e-4 and from 1e6."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    d = decimal.Decimal(repr(value))
    exp = d.adjusted()
    if -4 <= exp < 6:
        text = format(d, "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    digits = "".join(map(str, d.as_tuple().digits)).rstrip("0") or "0"
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{'-' if value < 0 else ''}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"


def age(timestamp: Any, now: datetime.datetime) -> str:
    if not isinstance(timestamp, str) or not timestamp:
        return "<unknown>"
    try:
        when = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    return human_duration((now - when).total_seconds())


def _typed_cell(col_type: str, value: Any, now: datetime.datetime) -> Any:
    if col_type == "string":
        return go_format(value)
    if col_type == "integer":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if col_type == "number":
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if col_type == "boolean":
        return value if isinstance(value, bool) else None
    if col_type == "date":
        return age(value, now) if isinstance(value, str) else None
    return None


# --------------------------------------------------------------- built-in printers

Printer = Callable[[Mapping[str, Any], datetime.datetime], list[Any]]


def _col(name: str, col_type: str = "string", priority: int = 0) -> dict[str, Any]:
    return {"name": name, "type": col_type, "format": "", "description": name, "priority": priority}


def _pod_row(pod: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in statuses)
    phase = status.get("reason") or status.get("phase") or "Unknown"
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        phase = "Terminating"
    return [
        pod["metadata"]["name"],
        f"{ready}/{len(spec.get('containers') or [])}",
        phase,
        restarts,
        age(pod["metadata"].get("creationTimestamp"), now),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        "<none>",
    ]


def _event_row(ev: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    """As kube's printers.go prints core/v1 Events (a series shows its count)."""
    obj = ev.get("involvedObject") or {}
    source = ev.get("source") or {}
    count = int(ev.get("count") or 1)
    first = ev.get("firstTimestamp") or ev["metadata"].get("creationTimestamp")
    last = ev.get("lastTimestamp") or first
    last_seen = age(last, now)
    if count > 1:
        last_seen = f"{last_seen} (x{count} over {age(first, now)})"
    return [
        last_seen,
        ev.get("type", ""),
        ev.get("reason", ""),
        f"{str(obj.get('kind', '')).lower()}/{obj.get('name', '')}",
        obj.get("fieldPath", ""),
        ", ".join(x for x in (source.get("component"), source.get("host")) if x),
        ev.get("message", ""),
        age(first, now),
        str(count),
        ev["metadata"]["name"],
    ]


BUILTIN_PRINTERS: dict[tuple[str, str], tuple[list[dict[str, Any]], Printer]] = {
    ("", "events"): (
        [
            _col("Last Seen"),
            _col("Type"),
            _col("Reason"),
            _col("Object"),
            _col("Subobject", priority=1),
            _col("Source", priority=1),
            _col("Message"),
            _col("First Seen", priority=1),
            _col("Count", priority=1),
            _col("Name", priority=1),
        ],
        _event_row,
    ),
    ("", "pods"): (
        [
            NAME_COLUMN,
            _col("Ready"),
            _col("Status"),
            _col("Restarts", "string"),
            _col("Age"),
            _col("IP", priority=1),
            _col("Node", priority=1),
            _col("Nominated Node", priority=1),
            _col("Readiness Gates", priority=1),
        ],
        _pod_row,
    ),
    ("", "namespaces"): (
        [NAME_COLUMN, _col("Status"), _col("Age")],
        lambda o, now: [
            o["metadata"]["name"],
            (o.get("status") or {}).get("phase", "Active"),
            age(o["metadata"].get("creationTimestamp"), now),
        ],
    ),
    ("", "configmaps"): (
        [NAME_COLUMN, _col("Data", "integer"), _col("Age")],
        lambda o, now: [
            o["metadata"]["name"],
            len(o.get("data") or {}) + len(o.get("binaryData") or {}),
            age(o["metadata"].get("creationTimestamp"), now),
        ],
    ),
    ("apiextensions.k8s.io", "customresourcedefinitions"): (
        [NAME_COLUMN, _col("Created At", "date")],
        lambda o, now: [o["metadata"]["name"], o["metadata"].get("creationTimestamp", "")],
    ),
}


def columns_for(rt: ResourceType) -> list[dict[str, Any]]:
    if not rt.custom and (rt.group, rt.plural) in BUILTIN_PRINTERS:
        return BUILTIN_PRINTERS[(rt.group, rt.plural)][0]
    extra = list(rt.printer_columns) if rt.custom and rt.printer_columns else [AGE_COLUMN]
    return [NAME_COLUMN] + [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": int(c.get("priority", 0)),
        }
        for c in extra
    ]


def row_cells(rt: ResourceType, obj: Mapping[str, Any], now: datetime.datetime) -> list[Any]:
    if not rt.custom and (rt.group, rt.plural) in BUILTIN_PRINTERS:
        return BUILTIN_PRINTERS[(rt.group, rt.plural)][1](obj, now)
    extra = list(rt.printer_columns) if rt.custom and rt.printer_columns else [AGE_COLUMN]
    cells: list[Any] = [obj["metadata"]["name"]]
    for col in extra:
        found = jsonpath.find(jsonpath.parse(col["jsonPath"]), obj)
        value = found[0] if found else None
        cells.append(None if value is None else _typed_cell(col.get("type", "string"), value, now))
    return cells


def table(
    rt: ResourceType,
    objs: Sequence[Mapping[str, Any]],
    *,
    resource_version: str,
    include_object: str,
    now: datetime.datetime,
    continue_token: str = "",
) -> dict[str, Any]:
    rows = []
    for obj in objs:
        row: dict[str, Any] = {"cells": row_cells(rt, obj, now)}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata", {}),
            }
        rows.append(row)
    metadata: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        metadata["continue"] = continue_token
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns_for(rt),
        "rows": rows,
    }


def check_columns(rt: ResourceType) -> None:
    """Parse every printer column's JSONPath now, so a bad CRD fails when loaded."""
    for col in rt.printer_columns:
        jsonpath.parse(col["jsonPath"])
