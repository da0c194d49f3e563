"""The object store: the API server's storage and admission semantics, no HTTP.

Everything a client can observe about state lives here:

- one global, monotonic ``resourceVersion`` (etcd's revision); each write bumps it, a
  no-op write does not (so a kopf patch that changes nothing triggers no event);
- ``uid``, ``creationTimestamp``, ``generation`` (bumped only for spec changes when a
  status subresource exists, for any non-metadata change otherwise, and when deletion
  starts); ``status`` only changes through ``/status`` and ``spec`` never does;
- create: 409 ``AlreadyExists``; update: 409 ``Conflict`` on a stale resourceVersion;
- delete: with finalizers the object is only marked (``deletionTimestamp``, 202) and
  goes when the last finalizer is removed; no new finalizers once marked;
- garbage collection on owner removal (background, foreground, orphan), and namespace
  deletion removing the namespace's content;
- a bounded event history, so a watch can resume from a resourceVersion (older ones
  are ``410 Gone``), and listeners that the HTTP layer turns into watch streams.

Not thread-safe by design: the emulator calls it only from its event-loop thread.
GC here is synchronous with the owner's removal (the real collector is a few seconds
behind) and starts from removed owners only: a dependent whose owner never existed
is left alone, where the real collector would delete it.
"""

from __future__ import annotations

import copy
import datetime
import random
import re
import string
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import errors, patches, tables
from .builtin import INITIAL_NAMESPACES
from .errors import APIError, FieldError
from .resources import Registry, ResourceType, from_crd
from .schema import OBJECT_META_FIELDS
from .selectors import FieldSelector, LabelSelector

GroupResource = tuple[str, str]  # (group, plural)
ObjectKey = tuple[str, str]  # (namespace or "", name)

SERVER_META = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
)
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
    "regex used for validation is "
    r"'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def timestamp(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WatchEvent:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    gr: GroupResource
    obj: dict[str, Any]
    old: dict[str, Any] | None  # the previous state: selectors need it to emit ADDED/DELETED


@dataclass(frozen=True)
class WriteOptions:
    dry_run: bool = False
    field_validation: str = "Warn"  # Ignore, Warn, Strict (kubectl apply sends Strict)


@dataclass
class WriteResult:
    obj: dict[str, Any]
    warnings: list[str]
    code: int = 200


class Store:
    def __init__(
        self,
        registry: Registry,
        *,
        history_limit: int = 10_000,
        now: Callable[[], datetime.datetime] = utcnow,
    ) -> None:
        self.registry = registry
        self.now = now
        self._objects: dict[GroupResource, dict[ObjectKey, dict[str, Any]]] = {}
        self._rv = 0
        self.history: deque[WatchEvent] = deque(maxlen=history_limit)
        self._listeners: list[Callable[[WatchEvent], None]] = []
        for ns in INITIAL_NAMESPACES:
            self.seed(
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns},
                    "status": {"phase": "Active"},
                }
            )

    # ------------------------------------------------------------ plumbing
    @property
    def resource_version(self) -> int:
        return self._rv

    def oldest_resumable(self) -> int:
        """Watches may resume from this resourceVersion or later; earlier is 410 Gone."""
        return self.history[0].rv - 1 if len(self.history) == self.history.maxlen else 0

    def subscribe(self, listener: Callable[[WatchEvent], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _bucket(self, gr: GroupResource) -> dict[ObjectKey, dict[str, Any]]:
        return self._objects.setdefault(gr, {})

    def _commit(
        self,
        event_type: str,
        rt_or_gr: ResourceType | GroupResource,
        key: ObjectKey,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
    ) -> dict[str, Any]:
        gr = rt_or_gr.group_resource if isinstance(rt_or_gr, ResourceType) else rt_or_gr
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        bucket = self._bucket(gr)
        if event_type == "DELETED":
            bucket.pop(key, None)
        else:
            bucket[key] = obj
        event = WatchEvent(
            self._rv, event_type, gr, copy.deepcopy(obj), copy.deepcopy(old) if old else None
        )
        self.history.append(event)
        for listener in list(self._listeners):
            listener(event)
        return obj

    def present(self, rt: ResourceType, obj: Mapping[str, Any]) -> dict[str, Any]:
        """A copy as the requested version shows it (no conversion: CRD strategy None)."""
        shown = copy.deepcopy(dict(obj))
        shown["apiVersion"] = rt.api_version
        return shown

    # ------------------------------------------------------------ reads
    def get(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        obj = self._bucket(rt.group_resource).get((namespace if rt.namespaced else "", name))
        if obj is None:
            raise errors.not_found(rt.plural, rt.group, name)
        return self.present(rt, obj)

    def find(self, gr: GroupResource, namespace: str, name: str) -> dict[str, Any] | None:
        return self._bucket(gr).get((namespace, name))

    def select(
        self,
        rt: ResourceType,
        namespace: str | None,
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
    ) -> list[dict[str, Any]]:
        items = []
        for (ns, _name), obj in sorted(self._bucket(rt.group_resource).items()):
            if namespace is not None and rt.namespaced and ns != namespace:
                continue
            if not self.matches(rt, obj, labels, fields):
                continue
            items.append(self.present(rt, obj))
        return items

    @staticmethod
    def matches(
        rt: ResourceType,
        obj: Mapping[str, Any],
        labels: LabelSelector | None,
        fields: FieldSelector | None,
    ) -> bool:
        if labels is not None and not labels.matches((obj.get("metadata") or {}).get("labels")):
            return False
        return fields is None or fields.matches(obj, rt.selectable_fields)

    # ------------------------------------------------------------ create
    def create(
        self,
        rt: ResourceType,
        namespace: str | None,
        body: Any,
        opts: WriteOptions = WriteOptions(),
    ) -> WriteResult:
        obj = self._decode(rt, body)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise errors.bad_request("resourceVersion should not be set on objects to be created")
        if rt.namespaced:
            ns = self._request_namespace(namespace, meta)
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
            ns = ""
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = self._generate_name(rt, ns, meta["generateName"])
        name = meta.get("name") or ""
        fes = self._validate_meta(rt, meta)
        if fes:
            raise errors.invalid_object(rt.kind, rt.group, name, fes)
        if rt.namespaced:
            self._require_namespace(ns, creating=True)
        if rt.group_resource == ("", "namespaces"):
            _namespace_defaults(obj)
        for key in SERVER_META:
            meta.pop(key, None)
        if rt.has_status:
            obj.pop("status", None)
            obj.update(self._initial_status(rt))
        obj, warnings = self._admit(rt, obj, None, opts)
        if (ns, name) in self._bucket(rt.group_resource):
            raise errors.already_exists(rt.plural, rt.group, name)
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = timestamp(self.now())
        if rt.tracks_generation:
            meta["generation"] = 1
        if opts.dry_run:
            return WriteResult(self.present(rt, obj), warnings, 201)
        self._on_crd_write(rt, obj)
        stored = self._commit("ADDED", rt, (ns, name), obj, None)
        return WriteResult(self.present(rt, stored), warnings, 201)

    # ------------------------------------------------------------ update & patch
    def replace(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        *,
        subresource: str = "",
        opts: WriteOptions = WriteOptions(),
    ) -> WriteResult:
        obj = self._decode(rt, body)
        key = (namespace if rt.namespaced else "", name)
        old = self._bucket(rt.group_resource).get(key)
        if old is None:
            raise errors.not_found(rt.plural, rt.group, name)
        if obj["metadata"].get("name", name) != name:
            raise errors.bad_request(
                f"the name of the object ({obj['metadata'].get('name')}) "
                f"does not match the name on the URL ({name})"
            )
        wanted_rv = obj["metadata"].get("resourceVersion")
        if not wanted_rv and rt.custom:
            fe = errors.invalid("metadata.resourceVersion", 0, "must be specified for an update")
            raise errors.invalid_object(rt.kind, rt.group, name, [fe])
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise errors.conflict(rt.plural, rt.group, name, errors.MODIFIED)
        return self._update(rt, key, old, obj, subresource=subresource, opts=opts)

    def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        patch_type: str,
        patch: Any,
        *,
        subresource: str = "",
        opts: WriteOptions = WriteOptions(),
    ) -> WriteResult:
        key = (namespace if rt.namespaced else "", name)
        old = self._bucket(rt.group_resource).get(key)
        if patch_type == patches.STRATEGIC and rt.custom:
            raise errors.unsupported_media_type(patch_type)
        if old is None:
            if patch_type == patches.APPLY and not subresource:
                applied = self._decode(rt, patch)
                applied["metadata"].setdefault("name", name)
                return self.create(rt, namespace, applied, opts)
            raise errors.not_found(rt.plural, rt.group, name)
        current = self.present(rt, old)
        if patch_type == patches.JSON:
            patched = patches.json_patch(current, patch)
        elif patch_type == patches.STRATEGIC:
            patched = patches.strategic_merge_patch(current, patch)
        elif patch_type in (patches.MERGE, patches.APPLY):
            if not isinstance(patch, dict):
                raise errors.bad_request("a merge patch must be a JSON object")
            patched = patches.merge_patch(current, patch)
        else:
            raise errors.unsupported_media_type(patch_type)
        if not isinstance(patched, dict):
            raise errors.bad_request("the patched object is not a JSON object")
        wanted_rv = (patched.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise errors.conflict(rt.plural, rt.group, name, errors.MODIFIED)
        patched = self._decode(rt, patched)
        return self._update(rt, key, old, patched, subresource=subresource, opts=opts)

    def _update(
        self,
        rt: ResourceType,
        key: ObjectKey,
        old: dict[str, Any],
        candidate: dict[str, Any],
        *,
        subresource: str,
        opts: WriteOptions,
    ) -> WriteResult:
        name = key[1]
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
        elif subresource:
            raise errors.not_found_path()
        else:
            new = candidate
            if rt.has_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            meta, old_meta = new["metadata"], old["metadata"]
            for field in ("name", "namespace", *SERVER_META):
                if field in old_meta:
                    meta[field] = old_meta[field]
                else:
                    meta.pop(field, None)
            if old_meta.get("deletionTimestamp"):
                added = [
                    f
                    for f in meta.get("finalizers") or []
                    if f not in (old_meta.get("finalizers") or [])
                ]
                if added:
                    fe = errors.forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted, "
                        f"found new finalizers {_go_strings(added)}",
                    )
                    raise errors.invalid_object(rt.kind, rt.group, name, [fe])
        fes = self._validate_meta(rt, new["metadata"])
        if fes:
            raise errors.invalid_object(rt.kind, rt.group, name, fes)
        new, warnings = self._admit(rt, new, self.present(rt, old), opts)
        if _same(new, old):
            return WriteResult(self.present(rt, old), warnings)  # a no-op write: no RV, no event
        if rt.tracks_generation and self._changes_generation(rt, old, new):
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1
        if opts.dry_run:
            return WriteResult(self.present(rt, new), warnings)
        self._on_crd_write(rt, new)
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            removed = self._remove(rt.group_resource, key, new, old)
            return WriteResult(self.present(rt, removed), warnings)
        stored = self._commit("MODIFIED", rt, key, new, old)
        self._sweep()
        return WriteResult(self.present(rt, stored), warnings)

    # ------------------------------------------------------------ delete
    def delete(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        *,
        propagation: str | None = None,
        preconditions: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> WriteResult:
        key = (namespace if rt.namespaced else "", name)
        old = self._bucket(rt.group_resource).get(key)
        if old is None:
            raise errors.not_found(rt.plural, rt.group, name)
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            raise errors.conflict(
                rt.plural,
                rt.group,
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, "
                f"UID in object meta: {old['metadata']['uid']}",
            )
        if (
            pre.get("resourceVersion")
            and pre["resourceVersion"] != old["metadata"]["resourceVersion"]
        ):
            raise errors.conflict(
                rt.plural,
                rt.group,
                name,
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {old['metadata']['resourceVersion']}",
            )
        if dry_run:
            return WriteResult(self.present(rt, old), [])
        if old["metadata"].get("deletionTimestamp"):
            return WriteResult(self.present(rt, old), [], 202)
        policy = propagation or "Background"
        uid = old["metadata"]["uid"]
        if policy == "Orphan":
            self._orphan_dependents(uid)
        new = copy.deepcopy(old)
        finalizers = list(new["metadata"].get("finalizers") or [])
        if (
            policy == "Foreground"
            and self._dependents(uid)
            and "foregroundDeletion" not in finalizers
        ):
            finalizers.append("foregroundDeletion")
            new["metadata"]["finalizers"] = finalizers
        if rt.group_resource == ("", "namespaces"):
            return self._delete_namespace(rt, key, old, new)
        if finalizers:
            self._mark(rt, key, new, old)
            if "foregroundDeletion" in finalizers:
                for dep_gr, dep_key in self._dependents(uid):
                    self._delete_dependent(dep_gr, dep_key)
            self._sweep()
            current = self._bucket(rt.group_resource).get(key)
            return WriteResult(self.present(rt, current or new), [], 202 if current else 200)
        removed = self._remove(rt.group_resource, key, new, old)
        if rt.return_deleted_object:
            return WriteResult(self.present(rt, removed), [])
        details = {"name": name, "group": rt.group, "kind": rt.plural, "uid": uid}
        return WriteResult(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            },
            [],
        )

    def _mark(
        self,
        rt_or_gr: ResourceType | GroupResource,
        key: ObjectKey,
        new: dict[str, Any],
        old: dict[str, Any],
    ) -> None:
        gr = rt_or_gr.group_resource if isinstance(rt_or_gr, ResourceType) else rt_or_gr
        meta = new["metadata"]
        meta["deletionTimestamp"] = timestamp(self.now())
        meta["deletionGracePeriodSeconds"] = 0
        if "generation" in meta and self._is_custom(gr):
            meta["generation"] = int(meta["generation"]) + 1
        self._commit("MODIFIED", gr, key, new, old)

    def _remove(
        self, gr: GroupResource, key: ObjectKey, last: dict[str, Any], old: dict[str, Any]
    ) -> dict[str, Any]:
        removed = self._commit("DELETED", gr, key, copy.deepcopy(last), old)
        if gr == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self.registry.remove_crd(key[1])
        self._collect(removed["metadata"].get("uid", ""))
        self._sweep()
        return removed

    def _delete_namespace(
        self, rt: ResourceType, key: ObjectKey, old: dict[str, Any], new: dict[str, Any]
    ) -> WriteResult:
        new.setdefault("status", {})["phase"] = "Terminating"
        self._mark(rt, key, new, old)
        ns = key[1]
        for gr, bucket in list(self._objects.items()):
            for obj_key in [k for k in bucket if k[0] == ns]:
                self._delete_dependent(gr, obj_key)
        self._sweep()
        current = self._bucket(rt.group_resource).get(key)
        return WriteResult(self.present(rt, current or new), [], 200)

    # ------------------------------------------------------------ garbage collection
    def _dependents(self, uid: str) -> list[tuple[GroupResource, ObjectKey]]:
        return [
            (gr, key)
            for gr, bucket in self._objects.items()
            for key, obj in bucket.items()
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _uid_exists(self, uid: str) -> bool:
        return any(
            o["metadata"].get("uid") == uid for b in self._objects.values() for o in b.values()
        )

    def _collect(self, uid: str) -> None:
        """Background GC: dependents of a removed owner with no remaining owner are deleted."""
        if not uid:
            return
        for gr, key in self._dependents(uid):
            obj = self._bucket(gr).get(key)
            if obj is None:
                continue
            others = [
                r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid
            ]
            if not any(self._uid_exists(r.get("uid", "")) for r in others):
                self._delete_dependent(gr, key)

    def _delete_dependent(self, gr: GroupResource, key: ObjectKey) -> None:
        obj = self._bucket(gr).get(key)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        new = copy.deepcopy(obj)
        if new["metadata"].get("finalizers"):
            self._mark(gr, key, new, obj)
        else:
            self._remove(gr, key, new, obj)

    def _orphan_dependents(self, uid: str) -> None:
        for gr, key in self._dependents(uid):
            old = self._bucket(gr)[key]
            new = copy.deepcopy(old)
            refs = [r for r in new["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                new["metadata"].pop("ownerReferences", None)
            self._commit("MODIFIED", gr, key, new, old)

    def _sweep(self) -> None:
        """Finish deletions that were waiting: foreground owners and terminating namespaces."""
        for _ in range(1000):  # each pass removes something or stops; bounded anyway
            progressed = False
            for gr, bucket in list(self._objects.items()):
                for key, obj in list(bucket.items()):
                    meta = obj["metadata"]
                    if not meta.get("deletionTimestamp"):
                        continue
                    fins = meta.get("finalizers") or []
                    if "foregroundDeletion" in fins and not self._dependents(meta["uid"]):
                        new = copy.deepcopy(obj)
                        new["metadata"]["finalizers"] = [
                            f for f in fins if f != "foregroundDeletion"
                        ]
                        if new["metadata"]["finalizers"]:
                            self._commit("MODIFIED", gr, key, new, obj)
                        else:
                            self._remove(gr, key, new, obj)
                        progressed = True
                    elif (
                        gr == ("", "namespaces")
                        and not fins
                        and not self._namespace_has_content(key[1])
                    ):
                        self._remove(gr, key, copy.deepcopy(obj), obj)
                        progressed = True
            if not progressed:
                return

    def _namespace_has_content(self, ns: str) -> bool:
        return any(
            k[0] == ns for gr, b in self._objects.items() if gr != ("", "namespaces") for k in b
        )

    # ------------------------------------------------------------ direct access (seeding)
    def seed(self, obj: Mapping[str, Any], rt: ResourceType | None = None) -> dict[str, Any]:
        """Store an object as given (no admission), filling only what the server owns."""
        new = copy.deepcopy(dict(obj))
        rt = rt or self.registry.by_kind(new.get("apiVersion", ""), new.get("kind", ""))
        if rt is None:
            raise KeyError(
                f"no served resource for apiVersion={new.get('apiVersion')!r} "
                f"kind={new.get('kind')!r}"
            )
        new.setdefault("apiVersion", rt.api_version)
        new.setdefault("kind", rt.kind)
        meta = new.setdefault("metadata", {})
        ns = meta.get("namespace", "default") if rt.namespaced else ""
        if rt.namespaced:
            meta["namespace"] = ns
            if self.find(("", "namespaces"), "", ns) is None:
                self.seed(
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {"name": ns},
                        "status": {"phase": "Active"},
                    }
                )
        elif rt.group_resource == ("", "namespaces"):
            _namespace_defaults(new)
        key = (ns, meta["name"])
        old = self._bucket(rt.group_resource).get(key)
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta.setdefault(
            "creationTimestamp",
            old["metadata"]["creationTimestamp"] if old else timestamp(self.now()),
        )
        if rt.tracks_generation:
            meta.setdefault("generation", old["metadata"].get("generation", 1) if old else 1)
        meta.pop("resourceVersion", None)
        self._on_crd_write(rt, new)
        stored = self._commit("MODIFIED" if old else "ADDED", rt, key, new, old)
        return self.present(rt, stored)

    # ------------------------------------------------------------ admission helpers
    def _decode(self, rt: ResourceType, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version and api_version != rt.api_version and not self._same_group(rt, api_version):
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match "
                f"the expected API version ({rt.api_version})"
            )
        if kind and kind != rt.kind:
            raise errors.bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        meta = obj.get("metadata")
        if meta is None:
            obj["metadata"] = {}
        elif not isinstance(meta, dict):
            raise errors.bad_request("metadata must be a JSON object")
        obj["metadata"] = {
            k: v for k, v in obj["metadata"].items() if k in OBJECT_META_FIELDS and v is not None
        }
        obj["metadata"].pop("managedFields", None)
        return obj

    @staticmethod
    def _same_group(rt: ResourceType, api_version: str) -> bool:
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        return group == rt.group

    @staticmethod
    def _request_namespace(namespace: str | None, meta: Mapping[str, Any]) -> str:
        body_ns = meta.get("namespace")
        if namespace and body_ns and body_ns != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match "
                "the namespace sent on the request"
            )
        ns = namespace or body_ns
        if not ns:
            raise errors.bad_request("the namespace of the object is not set")
        return str(ns)

    def _require_namespace(self, ns: str, *, creating: bool) -> None:
        nso = self.find(("", "namespaces"), "", ns)
        if nso is None:
            raise errors.not_found("namespaces", "", ns)
        if creating and nso["metadata"].get("deletionTimestamp"):
            raise APIError(
                403,
                f"unable to create new content in namespace {ns} because it is being terminated",
                reason="Forbidden",
                details={"name": ns, "kind": "namespaces"},
            )

    def _generate_name(self, rt: ResourceType, ns: str, prefix: str) -> str:
        for _ in range(100):
            name = prefix + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            if (ns, name) not in self._bucket(rt.group_resource):
                return name
        raise APIError(500, "could not generate a unique name", reason="AlreadyExists")

    def _validate_meta(self, rt: ResourceType, meta: Mapping[str, Any]) -> list[FieldError]:
        name = meta.get("name")
        if not name:
            return [errors.required("metadata.name", "name or generateName is required")]
        if rt.group_resource == ("", "namespaces"):
            if not _DNS1123_LABEL.match(name) or len(name) > 63:
                return [
                    errors.invalid(
                        "metadata.name",
                        name,
                        DNS1123_LABEL_MSG,
                    )
                ]
        elif rt.group_resource != ("", "events") and (
            not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253
        ):
            return [
                errors.invalid(
                    "metadata.name",
                    name,
                    DNS1123_SUBDOMAIN_MSG,
                )
            ]
        return []

    def _initial_status(self, rt: ResourceType) -> dict[str, Any]:
        if rt.group_resource == ("", "pods"):
            return {"status": {"phase": "Pending", "qosClass": "BestEffort"}}
        if rt.group_resource == ("", "namespaces"):
            return {"status": {"phase": "Active"}}
        return {}

    def _admit(
        self, rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, opts: WriteOptions
    ) -> tuple[dict[str, Any], list[str]]:
        """Prune, default and validate (schema + CEL) a custom resource; check built-ins."""
        warnings: list[str] = []
        name = obj["metadata"].get("name", "")
        if rt.schema is not None:
            pruned = rt.schema.prune(obj)
            unknown = [f'unknown field "{p}"' for p in pruned.unknown_fields]
            if unknown and opts.field_validation == "Strict":
                raise errors.bad_request("strict decoding error: " + ", ".join(unknown))
            if opts.field_validation != "Ignore":
                warnings.extend(unknown)
            obj = rt.schema.default(pruned.obj)
            fes = rt.schema.validate(obj, old)
            if fes:
                raise errors.invalid_object(rt.kind, rt.group, name, fes)
        if rt.group_resource == ("", "pods"):
            fes = _validate_pod(obj)
            if fes:
                raise errors.invalid_object(rt.kind, rt.group, name, fes)
        if rt.group_resource == ("apiextensions.k8s.io", "customresourcedefinitions"):
            obj = self._admit_crd(obj)
        return obj, warnings

    def _admit_crd(self, crd: dict[str, Any]) -> dict[str, Any]:
        name = crd["metadata"].get("name", "")
        spec = crd.get("spec") or {}
        try:  # a CRD that does not load is a 422, as on a real server
            types = from_crd(crd)
            for rt in types:
                tables.check_columns(rt)
        except (KeyError, TypeError, ValueError) as e:
            fe = errors.invalid("spec", "object", str(e))
            raise errors.invalid_object(
                "CustomResourceDefinition", "apiextensions.k8s.io", name, [fe]
            ) from e
        expected = f"{(spec.get('names') or {}).get('plural')}.{spec.get('group')}"
        if name != expected:
            fe = errors.invalid("metadata.name", name, 'must be spec.names.plural+"."+spec.group')
            raise errors.invalid_object(
                "CustomResourceDefinition", "apiextensions.k8s.io", name, [fe]
            )
        crd["status"] = {
            "acceptedNames": spec.get("names") or {},
            "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
            "conditions": [
                {
                    "type": t,
                    "status": "True",
                    "reason": r,
                    "message": m,
                    "lastTransitionTime": timestamp(self.now()),
                }
                for t, r, m in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                )
            ],
        }
        return crd

    def _on_crd_write(self, rt: ResourceType, obj: Mapping[str, Any]) -> None:
        if rt.group_resource == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self.registry.add_crd(obj)

    def _is_custom(self, gr: GroupResource) -> bool:
        return any(rt.custom for rt in self.registry.versions_of(*gr))

    def _changes_generation(
        self, rt: ResourceType, old: Mapping[str, Any], new: Mapping[str, Any]
    ) -> bool:
        ignored = {"metadata", "status"} if rt.has_status else {"metadata"}
        ignored |= {"apiVersion", "kind"}

        def strip(o: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in o.items() if k not in ignored}

        return strip(old) != strip(new)


def _same(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    def norm(o: Mapping[str, Any]) -> dict[str, Any]:
        meta = {
            k: v
            for k, v in (o.get("metadata") or {}).items()
            if k not in ("resourceVersion", "managedFields")
        }
        return {
            **{k: v for k, v in o.items() if k not in ("metadata", "apiVersion")},
            "metadata": meta,
        }

    return norm(new) == norm(old)


def _namespace_defaults(obj: dict[str, Any]) -> None:
    """What the namespace strategy adds: the ``kubernetes`` finalizer and the name label
    (``kubernetes.io/metadata.name``, which namespaceSelectors rely on)."""
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    labels = obj["metadata"].setdefault("labels", {})
    labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]


def _go_strings(items: Iterable[str]) -> str:
    return "[]string{" + ", ".join(f'"{i}"' for i in items) + "}"


def _validate_pod(pod: Mapping[str, Any]) -> list[FieldError]:
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return [errors.required("spec.containers")]
    containers = spec.get("containers")
    if not containers:
        return [errors.required("spec.containers")]
    fes = []
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name"):
            fes.append(errors.required(f"spec.containers[{i}].name"))
        if not isinstance(c, dict) or not c.get("image"):
            fes.append(errors.required(f"spec.containers[{i}].image"))
    return fes
