"""The HTTP layer: KMock in front, the emulated Kubernetes API behind it.

Why this shape.  KMock 0.8's ``KubernetesEmulator`` keeps objects as merged dicts and
routes by a URL guesser (``/api/v1/namespaces/x`` parses as "namespace x, no
resource"; PUT is not an action; list/watch/create answer with fixed shapes), so its
gaps (design.md §6) are not fixable by configuration.  What KMock does well is the
front door: it parses and records every request, and its DSL lets a test declare
ad-hoc reactions (``emu.kmock['get /api/v1/pods'] << 503``) that take priority.  So
:class:`KubeAPIHandler` *is* a ``kmock.RawHandler`` (request log, DSL, error capture)
whose fallback, instead of KMock's emulator, is :class:`KubeAPI` here: routing by the
registry, the store's semantics, watch streams, tables and discovery.

Everything runs on the emulator's event loop; the store is touched only from it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from multidict import CIMultiDict

from . import discovery, errors, patches, protobuf, tables
from .errors import APIError
from .resources import Registry, ResourceType
from .selectors import FieldSelector, LabelSelector, parse_field_selector, parse_label_selector
from .store import Store, WatchEvent, WriteOptions, WriteResult

JSON_TYPE = "application/json"


@dataclass
class Fault:
    """``fail_next``: the next ``remaining`` matching requests get ``status``."""

    remaining: int
    status: int
    method: str | None = None
    path_regex: re.Pattern[str] | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        return self.path_regex is None or self.path_regex.search(path) is not None


@dataclass
class Settings:
    bookmark_interval: float = 30.0  # seconds between BOOKMARKs on quiet watches that allow them
    server_address: str = "127.0.0.1:0"


@dataclass(eq=False)
class _Watch:
    """One open watch stream, so ``drop_watches`` can end it from outside."""

    raw: aiohttp.web.BaseRequest
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    abort: bool = False


@dataclass(frozen=True)
class Target:
    """A parsed resource URL."""

    rt: ResourceType
    namespace: str | None
    name: str | None
    subresource: str


class KubeAPI:
    def __init__(self, store: Store, registry: Registry, settings: Settings) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.faults: list[Fault] = []
        self.watches: set[_Watch] = set()

    # ------------------------------------------------------------------ entry
    async def serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        raw = request._raw_request  # KMock keeps the aiohttp request; streams need it
        assert raw is not None
        method = raw.method.upper()
        try:
            fault = next((f for f in self.faults if f.matches(method, raw.path)), None)
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.faults.remove(fault)
                raise APIError(
                    fault.status,
                    f"injected failure (fail_next) for {method} {raw.path}",
                    headers={"Retry-After": "1"} if fault.status == 429 else {},
                )
            return await self._route(raw, method, request.body)
        except APIError as e:
            return _json(e.status(), e.code, e.headers)

    async def _route(
        self, raw: aiohttp.web.BaseRequest, method: str, body: bytes
    ) -> aiohttp.web.StreamResponse:
        path = raw.path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        if method == "GET":
            doc = self._non_resource(path, parts)
            if doc is not None:
                return doc
        if (len(parts) >= 2 and parts[0] == "api") or (len(parts) >= 3 and parts[0] == "apis"):
            target, watch_path = self._parse_target(parts)
            return await self._resource(raw, method, body, target, watch_path)
        raise errors.not_found_path()

    def _non_resource(self, path: str, parts: list[str]) -> aiohttp.web.StreamResponse | None:
        reg = self.registry
        doc: Any = None
        if path == "/":
            doc = discovery.root_paths(reg)
        elif path == "/version":
            doc = discovery.SERVER_VERSION
        elif path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok", content_type="text/plain")
        elif path == "/api":
            doc = discovery.api_versions(self.settings.server_address)
        elif path == "/apis":
            doc = discovery.api_group_list(reg)
        elif parts[0] == "apis" and len(parts) == 2:
            doc = discovery.api_group(reg, parts[1])
            if doc is None:
                raise errors.not_found_path()
        elif (len(parts) == 2 and parts[0] == "api") or (len(parts) == 3 and parts[0] == "apis"):
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            doc = discovery.api_resource_list(reg, group, version)
            if doc is None:
                raise errors.not_found_path()
        elif path == "/openapi/v2":
            doc = discovery.openapi_v2(reg)
        elif path == "/openapi/v3":
            doc = discovery.openapi_v3_index(reg)
        elif parts[:2] == ["openapi", "v3"]:
            rest = parts[2:]
            if rest[:1] == ["api"] and len(rest) == 2:
                doc = discovery.openapi_v3_group_version(reg, "", rest[1])
            elif rest[:1] == ["apis"] and len(rest) == 3:
                doc = discovery.openapi_v3_group_version(reg, rest[1], rest[2])
            if not doc or not doc.get("paths"):
                raise errors.not_found_path()
        else:
            return None
        return _json(doc)

    def _parse_target(self, parts: list[str]) -> tuple[Target, bool]:
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            group, version, rest = parts[1], parts[2], parts[3:]
        watch_path = bool(rest) and rest[0] == "watch"
        if watch_path:
            rest = rest[1:]
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise errors.not_found_path()
        rt = self.registry.get(group, version, rest[0])
        if rt is None or (namespace is not None and not rt.namespaced):
            raise errors.not_found_path()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub not in rt.subresources:
            raise errors.not_found_path()
        if name is not None and rt.namespaced and namespace is None:
            raise errors.not_found_path()
        return Target(rt, namespace, name, sub), watch_path

    # ------------------------------------------------------------------ resources
    async def _resource(
        self, raw: aiohttp.web.BaseRequest, method: str, body: bytes, t: Target, watch_path: bool
    ) -> aiohttp.web.StreamResponse:
        q = raw.query
        rt = t.rt
        opts = WriteOptions(
            dry_run=q.get("dryRun") == "All",
            field_validation=q.get("fieldValidation", "Warn") or "Warn",
        )
        if method == "GET":
            labels = parse_label_selector(q["labelSelector"]) if q.get("labelSelector") else None
            fields = (
                parse_field_selector(q["fieldSelector"], rt.selectable_fields)
                if q.get("fieldSelector")
                else None
            )
            if watch_path or q.get("watch") in ("true", "1"):
                if t.name is not None:
                    fields = parse_field_selector(f"metadata.name={t.name}", rt.selectable_fields)
                return await self._watch(raw, t, labels, fields)
            if t.name is None:
                return self._list(raw, t, labels, fields)
            obj = self.store.get(rt, t.namespace or "", t.name)
            if _wants_table(raw) and not t.subresource:
                return _json(self._table(raw, rt, [obj]))
            return _json(obj)
        if method == "POST":
            if t.name is not None:
                raise errors.method_not_allowed(method, rt.describe())
            return _write(self.store.create(rt, t.namespace, _decode(raw, body), opts))
        if method == "PUT":
            if t.name is None:
                raise errors.method_not_allowed(method, rt.describe())
            obj = _decode(raw, body)
            ns = t.namespace or ""
            return _write(
                self.store.replace(rt, ns, t.name, obj, subresource=t.subresource, opts=opts)
            )
        if method == "PATCH":
            if t.name is None:
                raise errors.method_not_allowed(method, rt.describe())
            ctype = _content_type(raw)
            if ctype not in patches.PATCH_TYPES:
                raise errors.unsupported_media_type(ctype)
            patch = _decode(raw, body)
            ns = t.namespace or ""
            return _write(
                self.store.patch(rt, ns, t.name, ctype, patch, subresource=t.subresource, opts=opts)
            )
        if method == "DELETE":
            options = _decode(raw, body) if body.strip() else {}
            if not isinstance(options, dict):
                raise errors.bad_request("DeleteOptions must be a JSON object")
            propagation = q.get("propagationPolicy") or options.get("propagationPolicy")
            dry_run = opts.dry_run or options.get("dryRun") == ["All"]
            if t.name is None:
                return self._delete_collection(raw, t, propagation, dry_run)
            result = self.store.delete(
                rt,
                t.namespace or "",
                t.name,
                propagation=propagation,
                preconditions=options.get("preconditions"),
                dry_run=dry_run,
            )
            return _write(result)
        raise errors.method_not_allowed(method, rt.describe())

    def _list(
        self,
        raw: aiohttp.web.BaseRequest,
        t: Target,
        labels: LabelSelector | None,
        fields: FieldSelector | None,
    ) -> aiohttp.web.StreamResponse:
        items = self.store.select(t.rt, t.namespace, labels, fields)
        rv = str(self.store.resource_version)
        start = _decode_continue(raw.query.get("continue", ""))
        limit = int(raw.query.get("limit") or 0)
        page = items[start : start + limit] if limit > 0 else items[start:]
        rest = len(items) - start - len(page)
        token = _encode_continue(start + len(page), rv) if rest > 0 else ""
        if _wants_table(raw):
            return _json(self._table(raw, t.rt, page, token))
        meta: dict[str, Any] = {"resourceVersion": rv}
        if token:
            meta["continue"] = token
            meta["remainingItemCount"] = rest
        return _json(
            {
                "kind": t.rt.list_kind,
                "apiVersion": t.rt.api_version,
                "metadata": meta,
                "items": page,
            }
        )

    def _table(
        self,
        raw: aiohttp.web.BaseRequest,
        rt: ResourceType,
        objs: list[dict[str, Any]],
        token: str = "",
    ) -> dict[str, Any]:
        return tables.table(
            rt,
            objs,
            resource_version=str(self.store.resource_version),
            include_object=raw.query.get("includeObject", "PartialObjectMetadata"),
            now=self.store.now(),
            continue_token=token,
        )

    def _delete_collection(
        self, raw: aiohttp.web.BaseRequest, t: Target, propagation: str | None, dry_run: bool
    ) -> aiohttp.web.StreamResponse:
        q = raw.query
        labels = parse_label_selector(q["labelSelector"]) if q.get("labelSelector") else None
        fields = (
            parse_field_selector(q["fieldSelector"], t.rt.selectable_fields)
            if q.get("fieldSelector")
            else None
        )
        deleted = []
        for obj in self.store.select(t.rt, t.namespace, labels, fields):
            meta = obj["metadata"]
            self.store.delete(
                t.rt,
                meta.get("namespace", ""),
                meta["name"],
                propagation=propagation,
                dry_run=dry_run,
            )
            deleted.append(obj)
        return _json(
            {
                "kind": t.rt.list_kind,
                "apiVersion": t.rt.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": deleted,
            }
        )

    # ------------------------------------------------------------------ watch
    async def _watch(
        self,
        raw: aiohttp.web.BaseRequest,
        t: Target,
        labels: LabelSelector | None,
        fields: FieldSelector | None,
    ) -> aiohttp.web.StreamResponse:
        q = raw.query
        rt, store = t.rt, self.store
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        bookmarks = q.get("allowWatchBookmarks") == "true"
        rv_param = q.get("resourceVersion", "")
        initial_events = q.get("sendInitialEvents") == "true"
        as_table = _wants_table(raw)

        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        gr = rt.group_resource

        def listener(event: WatchEvent) -> None:
            if event.gr == gr:
                queue.put_nowait(event)

        # No await between the snapshot and the subscription: nothing can slip in between.
        pending: list[dict[str, Any]] = []
        if rv_param in ("", "0") or initial_events:
            pending = [
                {"type": "ADDED", "object": o}
                for o in store.select(rt, t.namespace, labels, fields)
            ]
            last_rv = store.resource_version
        else:
            try:
                since = int(rv_param)
            except ValueError as e:
                raise errors.bad_request(f"invalid resource version: {rv_param!r}") from e
            if since < store.oldest_resumable():
                gone = errors.gone(
                    f"too old resource version: {since} ({store.oldest_resumable()})"
                )
                return await self._stream_once(raw, [{"type": "ERROR", "object": gone.status()}])
            for event in store.history:
                if event.rv > since and event.gr == gr:
                    queue.put_nowait(event)
            last_rv = since
        unsubscribe = store.subscribe(listener)
        watch = _Watch(raw)
        self.watches.add(watch)
        resp = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": JSON_TYPE})
        resp.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        try:
            await resp.prepare(raw)
            for item in pending:
                await self._send(resp, rt, item, as_table)
            if initial_events and bookmarks:
                await self._send(resp, rt, self._bookmark(rt, initial_end=True), False)
            while not watch.stop.is_set():
                wait = self.settings.bookmark_interval
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        break
                next_event = await _next_event(queue, watch.stop, wait)
                if next_event is None:
                    if bookmarks and not watch.stop.is_set():
                        await self._send(resp, rt, self._bookmark(rt), False)
                    continue
                if next_event.rv <= last_rv:
                    continue  # delivered by the history replay already
                last_rv = next_event.rv
                change = self._translate(t, next_event, labels, fields)
                if change is not None:
                    await self._send(resp, rt, change, as_table)
            if watch.abort:
                if raw.transport is not None:
                    raw.transport.abort()  # a dropped connection: no terminating chunk
                return resp
            if bookmarks and deadline is not None and loop.time() >= deadline:
                await self._send(resp, rt, self._bookmark(rt), False)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; nothing to tell it
        finally:
            unsubscribe()
            self.watches.discard(watch)
        return resp

    async def _stream_once(
        self, raw: aiohttp.web.BaseRequest, items: list[dict[str, Any]]
    ) -> aiohttp.web.StreamResponse:
        resp = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": JSON_TYPE})
        resp.enable_chunked_encoding()
        await resp.prepare(raw)
        for item in items:
            await resp.write(json.dumps(item).encode() + b"\n")
        await resp.write_eof()
        return resp

    def _translate(
        self,
        t: Target,
        event: WatchEvent,
        labels: LabelSelector | None,
        fields: FieldSelector | None,
    ) -> dict[str, Any] | None:
        """A store event as this watcher sees it: leaving the selection is a DELETED."""

        def visible(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            if (
                t.namespace is not None
                and t.rt.namespaced
                and obj["metadata"].get("namespace") != t.namespace
            ):
                return False
            return self.store.matches(t.rt, obj, labels, fields)

        now, before = visible(event.obj), visible(event.old)
        if event.type == "DELETED":
            kind = "DELETED" if now or before else None
        elif now and before:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        elif before:
            kind = "DELETED"
        else:
            kind = None
        return (
            None if kind is None else {"type": kind, "object": self.store.present(t.rt, event.obj)}
        )

    def _bookmark(self, rt: ResourceType, *, initial_end: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(self.store.resource_version)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta},
        }

    async def _send(
        self,
        resp: aiohttp.web.StreamResponse,
        rt: ResourceType,
        item: dict[str, Any],
        as_table: bool,
    ) -> None:
        if as_table and item["type"] in ("ADDED", "MODIFIED", "DELETED"):
            item = {
                "type": item["type"],
                "object": tables.table(
                    rt,
                    [item["object"]],
                    resource_version=item["object"]["metadata"].get("resourceVersion", ""),
                    include_object="PartialObjectMetadata",
                    now=self.store.now(),
                ),
            }
        await resp.write(json.dumps(item, separators=(",", ":")).encode() + b"\n")

    def end_watches(self, *, abort: bool) -> int:
        watches = list(self.watches)
        for w in watches:
            w.abort = abort
            w.stop.set()
        return len(watches)


# ---------------------------------------------------------------------- the KMock front


@attrs.define(kw_only=True)
class KubeAPIHandler(kmock.RawHandler):
    """A ``kmock.RawHandler``: faults, then KMock DSL reactions, then the emulated API."""

    api: KubeAPI

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """``RawHandler.__call__`` with a parser that survives KMock's URL guesser.

        kmock 0.8's ``parse_path`` raises on ``/api/v1/namespaces`` (it expects a name
        after ``namespaces``), so the request is parsed here: KMock's way when it can,
        HTTP fields only when it cannot (our routing does not use KMock's guesses).
        """
        await raw_request.read()
        try:
            request = await self._parse(raw_request)
            self._requests.append(request)
            return await self._handle(request)
        except Exception as e:
            if not self._errors:
                raise
            self._errors[-1].append(e)
            return await self._render_error(e)

    async def _parse(self, raw: aiohttp.web.BaseRequest) -> kmock.Request:
        try:
            return await kmock.Request._parse(raw, id=len(self._requests))
        except ValueError:
            body = await raw.read()
            return kmock.Request(
                id=len(self._requests),
                raw_request=raw,
                url=raw.url,
                method=raw.method,
                params=dict(raw.query),
                headers=dict(raw.headers),
                cookies=dict(raw.cookies),
                body=body,
                text=body.decode("utf-8", "replace"),
            )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.api.faults and request._raw_request is not None:
            raw = request._raw_request
            if any(f.matches(raw.method, raw.path) for f in self.api.faults):
                return await self.api.serve(request)
        try:
            return await super()._handle(request)  # reactions declared through the KMock DSL
        except NotImplementedError:
            return await self.api.serve(request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # An exception that is not an APIError is an emulator bug or limitation: answer as the
        # real server would (500, a Status) and keep it in ``errors`` for the test to fail on.
        body = APIError(
            500,
            f"Internal error occurred: {exc!r}",
            details={"causes": [{"message": traceback.format_exc()[-2000:]}]},
        ).status()
        return _json(body, 500)

    async def _stream_error(self, exc: Exception, raw_response: aiohttp.web.StreamResponse) -> None:
        line = json.dumps(
            {"type": "ERROR", "object": APIError(500, f"Internal error occurred: {exc!r}").status()}
        )
        with contextlib.suppress(ConnectionError):
            await raw_response.write(line.encode() + b"\n")


# ---------------------------------------------------------------------- helpers


async def _next_event(
    queue: asyncio.Queue[WatchEvent], stop: asyncio.Event, wait: float
) -> WatchEvent | None:
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {getter, stopper}, timeout=max(wait, 0), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for fut in (getter, stopper):
            if not fut.done():
                fut.cancel()
    if getter in done:
        return getter.result()
    return None


def _json(
    doc: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> aiohttp.web.Response:
    hdrs: CIMultiDict[str] = CIMultiDict(headers or {})
    return aiohttp.web.Response(
        body=json.dumps(doc).encode(), status=status, headers=hdrs, content_type=JSON_TYPE
    )


def _write(result: WriteResult) -> aiohttp.web.Response:
    resp = _json(result.obj, result.code)
    for warning in result.warnings:
        resp.headers.add("Warning", f"299 - {json.dumps(warning)}")
    return resp


def _content_type(raw: aiohttp.web.BaseRequest) -> str:
    return (raw.headers.get("Content-Type") or JSON_TYPE).split(";")[0].strip().lower()


def _decode(raw: aiohttp.web.BaseRequest, body: bytes) -> Any:
    ctype = _content_type(raw)
    if ctype == "application/vnd.kubernetes.protobuf":
        return protobuf.decode(body)
    if not body.strip():
        raise errors.bad_request("the request body is empty")
    try:
        if ctype in (patches.APPLY, "application/yaml", "application/x-yaml"):
            return yaml.safe_load(body)
        return json.loads(body)
    except (ValueError, yaml.YAMLError) as e:
        raise errors.bad_request(f"the body of the request could not be decoded: {e}") from e


def _wants_table(raw: aiohttp.web.BaseRequest) -> bool:
    accept = raw.headers.get("Accept", "")
    return any("as=Table" in part and "g=meta.k8s.io" in part for part in accept.split(","))


def _encode_continue(start: int, rv: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"start": start, "rv": rv}).encode()).decode()


def _decode_continue(token: str) -> int:
    if not token:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(token.encode()))["start"])
    except (ValueError, KeyError, TypeError) as e:
        raise errors.bad_request("continue key is not valid") from e
