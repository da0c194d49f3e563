"""The four PATCH content types, applied to plain JSON values.

- ``application/merge-patch+json``: RFC 7386, exactly.
- ``application/json-patch+json``: RFC 6902 via the ``jsonpatch`` library; a failed
  ``test`` op is a 422, which is what kopf relies on for optimistic concurrency.
- ``application/strategic-merge-patch+json``: an approximation.  Go structs carry the
  real merge keys; here a table of the well-known ones (containers by ``name``,
  ownerReferences by ``uid``, finalizers as a set, ...) is applied wherever the key
  appears, and the ``$patch``/``$setElementOrder``/``$deleteFromPrimitiveList``/
  ``$retainKeys`` directives are honoured.  Enough for ``kubectl apply``/``patch`` of
  core objects.  Custom resources reject it with 415, as the real server does.
- ``application/apply-patch+yaml`` (server-side apply): approximated as "create if
  absent, else merge-patch the applied configuration"; no field ownership, so fields
  dropped from the configuration are not removed.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from .errors import APIError, bad_request

MERGE = "application/merge-patch+json"
JSON = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"
PATCH_TYPES = (MERGE, JSON, STRATEGIC, APPLY)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise bad_request("json patch must be a JSON array of operations")
    try:
        return jsonpatch.JsonPatch(ops).apply(target, in_place=False)
    except jsonpatch.JsonPatchTestFailed as e:
        raise APIError(
            422, f"the server rejected our request due to an error in our request: {e}"
        ) from e
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
        raise APIError(
            422, f"the server rejected our request due to an error in our request: {e}"
        ) from e


# Well-known patchMergeKey values from the core API types, by field name.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "conditions": "type",
    "hostAliases": "ip",
    "resourceClaims": "name",
}
# Primitive lists with patchStrategy=merge: the patch's items are added, not replacing.
MERGED_PRIMITIVE_LISTS = frozenset({"finalizers"})


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    return _smp_map(target if isinstance(target, dict) else {}, patch)


def _smp_map(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return {}
    result = dict(target)
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key == "$patch":
            continue
        if key == "$retainKeys":
            keep = set(value or []) | {k for k in patch if not k.startswith("$")}
            result = {k: v for k, v in result.items() if k in keep}
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            drop = set(map(_hashable, value or []))
            result[field] = [v for v in result.get(field) or [] if _hashable(v) not in drop]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            old = result.get(key)
            result[key] = _smp_map(old if isinstance(old, dict) else {}, value)
        elif isinstance(value, list):
            result[key] = _smp_list(key, result.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    for field, order in orders.items():
        if isinstance(result.get(field), list):
            result[field] = _reorder(field, result[field], order)
    return result


def _smp_list(field: str, target: Any, patch: list[Any]) -> list[Any]:
    old = target if isinstance(target, list) else []
    if field in MERGED_PRIMITIVE_LISTS:
        merged = list(old)
        for item in patch:
            if item not in merged:
                merged.append(item)
        return merged
    key = MERGE_KEYS.get(field)
    if key is None or not all(isinstance(i, dict) and key in i for i in patch):
        return [i for i in copy.deepcopy(patch) if not (isinstance(i, dict) and i.get("$patch"))]
    merged = [copy.deepcopy(i) for i in old]
    for item in patch:
        idx = next(
            (n for n, o in enumerate(merged) if isinstance(o, dict) and o.get(key) == item[key]),
            None,
        )
        if item.get("$patch") == "delete":
            if idx is not None:
                merged.pop(idx)
        elif idx is None:
            merged.append(_smp_map({}, item))
        else:
            merged[idx] = _smp_map(merged[idx], item)
    return merged


def _reorder(field: str, items: list[Any], order: list[Any]) -> list[Any]:
    key = MERGE_KEYS.get(field)

    def ident(item: Any) -> Any:
        return _hashable(item.get(key) if key and isinstance(item, dict) else item)

    wanted = [ident(o) for o in order]
    ranked = sorted(
        items, key=lambda i: wanted.index(ident(i)) if ident(i) in wanted else len(wanted)
    )
    return ranked


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, dict | list) else value
