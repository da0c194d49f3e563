"""List+watch of one resource into a local cache (a minimal client-go reflector).

The agent acts on what it last knew: when the API server goes away it keeps
the cache (and keeps scanning with the last known policies) and reconnects
with exponential backoff.  A watch resumes from the last resourceVersion; a
410 Gone, a server without resourceVersions, or a broken stream re-lists,
replacing the cache wholesale so deletions missed while away are not kept.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

from halfclose.agent.kube.client import JSON, ApiError, RawClient

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace or "", name)


def object_key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class Reflector:
    """Keeps ``items`` equal to the server's view of ``path`` (filtered by ``query``).

    ``on_change`` runs on the reflector's thread after every change and after
    each (re-)list; keep it cheap (set an Event).  ``synced`` is set after the
    first successful list: readiness.
    """

    def __init__(
        self,
        client: RawClient,
        path: str,
        name: str,
        on_change: Callable[[], None],
        *,
        query: Mapping[str, str] | None = None,
        watch_timeout_seconds: int = 300,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
    ) -> None:
        self.client = client
        self.path = path
        self.name = name
        self.query = dict(query or {})
        self.on_change = on_change
        self.watch_timeout_seconds = watch_timeout_seconds
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.synced = threading.Event()
        self.connected = False
        self._lock = threading.Lock()
        self._items: dict[Key, JSON] = {}
        self._stop = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    # -- reading (any thread) -----------------------------------------------------

    def items(self) -> dict[Key, JSON]:
        with self._lock:
            return dict(self._items)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            # Unblocks the read the watch thread is sitting in.
            try:
                response.shutdown()
            except Exception:
                with contextlib.suppress(Exception):
                    response.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------

    def _list(self) -> str:
        body = self.client.get(self.path, self.query)
        items = {object_key(obj): obj for obj in body.get("items") or ()}
        with self._lock:
            self._items = items
        self.synced.set()
        self.connected = True
        self.on_change()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _apply(self, event: JSON) -> str | None:
        """Apply one watch event; returns the new resourceVersion, or None to re-list."""
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            log.info(
                "watch %s: error event %s (%s); re-listing", self.name, code, obj.get("message")
            )
            return None
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            return rv
        key = object_key(obj)
        with self._lock:
            if kind == "DELETED":
                self._items.pop(key, None)
            elif kind in ("ADDED", "MODIFIED"):
                self._items[key] = obj
            else:
                return rv
        self.on_change()
        return rv

    def _watch(self, rv: str) -> None:
        """Follow the watch from ``rv`` until it ends; raises ApiError on failure."""
        while not self._stop.is_set():
            query = dict(self.query)
            query["allowWatchBookmarks"] = "true"
            query["timeoutSeconds"] = str(self.watch_timeout_seconds)
            if rv:
                query["resourceVersion"] = rv
            # Read timeout a bit above the server's own: a silent dead stream is noticed.
            self._response, events = self.client.watch(
                self.path, query, read_timeout=self.watch_timeout_seconds + 30
            )
            try:
                for event in events:
                    if self._stop.is_set():
                        return
                    new_rv = self._apply(event)
                    if new_rv is None:
                        return  # 410 Gone or another error: the caller re-lists
                    if new_rv:
                        rv = new_rv
            finally:
                self._response = None
            if not rv:
                # A server that gives no resourceVersion cannot resume a watch
                # without replaying or losing events: re-list instead.
                return

    def _run(self) -> None:
        delay = self.backoff_initial
        while not self._stop.is_set():
            try:
                rv = self._list()
                delay = self.backoff_initial
                self._watch(rv)
            except ApiError as exc:
                self.connected = False
                log.warning("watch %s: %s; retrying in %.1fs", self.name, exc, delay)
            except Exception as exc:
                self.connected = False
                if self._stop.is_set():
                    return
                log.warning("watch %s broke: %r; retrying in %.1fs", self.name, exc, delay)
            else:
                # The watch ended normally: re-list soon.  The short pause keeps
                # a server that ends every watch at once from spinning us.
                self._stop.wait(0.1)
                continue
            # Jitter spreads the reconnects of a whole cluster's agents.
            self._stop.wait(delay * random.uniform(0.5, 1.0))  # noqa: S311
            delay = min(self.backoff_max, delay * 2)
