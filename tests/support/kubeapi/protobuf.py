"""Just enough Kubernetes protobuf to read what kubectl's typed clients send.

kubectl writes some built-in kinds with ``Content-Type: application/vnd.kubernetes.protobuf``
(``kubectl create namespace``, ``kubectl create configmap``), and the real server
always understands that.  The wire format is a ``k8s\\0`` magic, then a
``runtime.Unknown`` envelope (typeMeta, raw) whose ``raw`` is the kind's message.
Decoding needs the field numbers from k8s.io/api's generated.proto, so only
ObjectMeta, Namespace and ConfigMap are mapped; any other kind is a 415 that says so.
Responses stay JSON, which these clients accept as well.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable, Iterator
from typing import Any

from .errors import APIError

MAGIC = b"k8s\x00"


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field of one message."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _str(b: bytes) -> str:
    return b.decode("utf-8")


def _map(entries: list[bytes], value: Callable[[bytes], Any] = _str) -> dict[str, Any]:
    result = {}
    for entry in entries:
        fields = {n: v for n, _, v in _fields(entry)}
        result[_str(fields.get(1, b""))] = value(fields.get(2, b""))
    return result


def _time(b: bytes) -> str:
    fields = {n: v for n, _, v in _fields(b)}
    when = datetime.datetime.fromtimestamp(fields.get(1, 0), tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _object_meta(data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    repeated: dict[int, list[bytes]] = {}
    for number, _, value in _fields(data):
        if number in (11, 12, 13, 14):
            repeated.setdefault(number, []).append(value)
        elif number == 7:
            meta["generation"] = value
        elif number == 10:
            meta["deletionGracePeriodSeconds"] = value
        elif number in (8, 9):
            meta["creationTimestamp" if number == 8 else "deletionTimestamp"] = _time(value)
        elif number in (1, 2, 3, 4, 5, 6):
            text = _str(value)
            if text:
                meta[
                    ("name", "generateName", "namespace", "selfLink", "uid", "resourceVersion")[
                        number - 1
                    ]
                ] = text
    if 11 in repeated:
        meta["labels"] = _map(repeated[11])
    if 12 in repeated:
        meta["annotations"] = _map(repeated[12])
    if 13 in repeated:
        meta["ownerReferences"] = [_owner_reference(b) for b in repeated[13]]
    if 14 in repeated:
        meta["finalizers"] = [_str(b) for b in repeated[14]]
    return meta


def _owner_reference(data: bytes) -> dict[str, Any]:
    names = {
        1: "kind",
        3: "name",
        4: "uid",
        5: "apiVersion",
        6: "controller",
        7: "blockOwnerDeletion",
    }
    ref: dict[str, Any] = {}
    for number, wire, value in _fields(data):
        if number in names:
            ref[names[number]] = bool(value) if wire == 0 else _str(value)
    return ref


def _namespace(fields: list[tuple[int, int, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, _, value in fields:
        if number == 2:
            finalizers = [_str(v) for n, _, v in _fields(value) if n == 1]
            obj["spec"] = {"finalizers": finalizers} if finalizers else {}
    return obj


def _configmap(fields: list[tuple[int, int, Any]]) -> dict[str, Any]:
    data = [v for n, _, v in fields if n == 2]
    binary = [v for n, _, v in fields if n == 3]
    obj: dict[str, Any] = {}
    if data:
        obj["data"] = _map(data)
    if binary:
        obj["binaryData"] = _map(binary, lambda b: base64.b64encode(b).decode())
    for n, _, v in fields:
        if n == 4:
            obj["immutable"] = bool(v)
    return obj


DECODERS: dict[tuple[str, str], Callable[[list[tuple[int, int, Any]]], dict[str, Any]]] = {
    ("v1", "Namespace"): _namespace,
    ("v1", "ConfigMap"): _configmap,
}


def decode(body: bytes) -> dict[str, Any]:
    if not body.startswith(MAGIC):
        raise APIError(415, "protobuf body without the k8s magic prefix")
    envelope = {n: v for n, _, v in _fields(body[len(MAGIC) :])}
    type_meta = {n: _str(v) for n, _, v in _fields(envelope.get(1, b""))}
    api_version, kind = type_meta.get(1, ""), type_meta.get(2, "")
    decoder = DECODERS.get((api_version, kind))
    if decoder is None:
        raise APIError(
            415,
            f"the API emulator decodes protobuf only for {sorted(k for _, k in DECODERS)}, "
            f"not {api_version} {kind}: send JSON (kubectl apply -f does)",
        )
    fields = list(_fields(envelope.get(2, b"")))
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind}
    for number, _, value in fields:
        if number == 1:
            obj["metadata"] = _object_meta(value)
    obj.update(decoder(fields))
    return obj
