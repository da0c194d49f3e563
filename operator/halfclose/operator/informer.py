"""One list/watch of one resource kind, feeding a sink with decoded objects.

The informer pattern of client-go, reduced to what the operator needs: a
paginated list, then a watch from the list's resourceVersion with bookmarks;
on ``410 Gone``, a dropped stream or any error it lists again (after a
back-off for errors) and tells the sink only what differs from what it had,
including objects that vanished meanwhile.  Each object is decoded once per
change, by the sink.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientError

from halfclose.operator.client import JSON, ApiError, KubeClient

log = logging.getLogger("halfclose.operator")

Key = tuple[str, str]  # (namespace or "", name)
# sink(key, object or None when deleted); a raised exception is a bug, not a fault.
Sink = Callable[[Key, Mapping[str, Any] | None], None]


@dataclass(frozen=True, slots=True)
class WatchedKind:
    """What to list and watch: ``path`` is the collection URL (cluster-wide)."""

    name: str  # for logs
    path: str
    field_selector: str | None = None
    accept: str = JSON  # METADATA_ONLY for labels-only kinds
    watch_accept: str = JSON


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


@dataclass
class Informer:
    client: KubeClient
    kind: WatchedKind
    sink: Sink
    page_size: int = 500
    watch_seconds: int = 300  # the server ends each watch after this; we re-watch
    backoff: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 5.0)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    lists: int = 0  # completed lists (the first one, then re-lists)
    _versions: dict[Key, str] = field(default_factory=dict)

    def _params(self) -> dict[str, str]:
        return {"fieldSelector": self.kind.field_selector} if self.kind.field_selector else {}

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                version: str | None = await self._list()
                failures = 0
                while version is not None:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except (ApiError, OSError, TimeoutError, ValueError, ClientError) as exc:
                delay = self.backoff[min(failures, len(self.backoff) - 1)]
                failures += 1
                log.warning("%s: %s; listing again in %.1fs", self.kind.name, exc, delay)
                await asyncio.sleep(delay)
            except Exception:
                # A bug (in a sink): say so loudly, but keep the inventory alive.
                delay = self.backoff[-1]
                log.exception("%s: unexpected error; listing again in %.1fs", self.kind.name, delay)
                await asyncio.sleep(delay)

    async def _list(self) -> str:
        seen: dict[Key, str] = {}
        params = {**self._params(), "limit": str(self.page_size)}
        while True:
            page = await self.client.request(
                "GET", self.kind.path, params=params, accept=self.kind.accept
            )
            for obj in page.get("items") or ():
                key = key_of(obj)
                version = str((obj.get("metadata") or {}).get("resourceVersion", ""))
                seen[key] = version
                if self._versions.get(key) != version:
                    self.sink(key, obj)
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
            await asyncio.sleep(0)
        for key in self._versions.keys() - seen.keys():
            self.sink(key, None)  # deleted while we were not watching
        self._versions = seen
        self.lists += 1
        self.synced.set()
        return str(meta.get("resourceVersion", ""))

    async def _watch(self, version: str) -> str | None:
        """Watch from ``version``; the version to resume from, or None to list again."""
        params = {
            **self._params(),
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_seconds),
        }
        async for event in self.client.watch(
            self.kind.path,
            params,
            accept=self.kind.watch_accept,
            read_timeout=self.watch_seconds + 30,
        ):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    return None  # too old: list again
                raise ApiError(int(obj.get("code") or 500), str(obj.get("message", "")))
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            key = key_of(obj)
            if kind == "DELETED":
                if self._versions.pop(key, None) is not None:
                    self.sink(key, None)
            else:
                self._versions[key] = version
                self.sink(key, obj)
        return version
