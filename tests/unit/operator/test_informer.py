"""The informer: paginated list, watch from its version, re-list on 410 with deletions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from halfclose.operator.client import ApiError
from halfclose.operator.informer import Informer, Key, WatchedKind


def _obj(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": version}}


class FakeClient:
    """Lists and watch streams scripted in order; records what was asked."""

    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[Any]) -> None:
        self.lists, self.watches = lists, watches
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        params = dict(kw.get("params") or {})
        self.calls.append(("list", params))
        pages = self.lists[0]
        index = int(params.get("continue", "0"))
        if index + 1 == len(pages):
            self.lists.pop(0)
        more = {"continue": str(index + 1)} if index + 1 < len(pages) else {}
        return {"items": pages[index]["items"], "metadata": {**pages[index]["meta"], **more}}

    async def watch(
        self, path: str, params: Mapping[str, str], **_: Any
    ) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(("watch", dict(params)))
        script = self.watches.pop(0) if self.watches else None
        if script is None:
            await asyncio.Event().wait()  # nothing more: block until cancelled
            return
        if isinstance(script, Exception):
            raise script
        for event in script:
            yield event


def test_list_watch_relist() -> None:
    seen: list[tuple[Key, str | None]] = []

    def sink(key: Key, obj: Mapping[str, Any] | None) -> None:
        seen.append((key, obj["metadata"]["resourceVersion"] if obj else None))

    client = FakeClient(
        lists=[
            [  # two pages
                {"items": [_obj("a", "1")], "meta": {}},
                {"items": [_obj("b", "2")], "meta": {"resourceVersion": "5"}},
            ],
            [  # after 410: a unchanged, b gone, c new
                {"items": [_obj("a", "1"), _obj("c", "9")], "meta": {"resourceVersion": "10"}},
            ],
            [{"items": [_obj("a", "1"), _obj("c", "9")], "meta": {"resourceVersion": "12"}}],
        ],
        watches=[
            [
                {"type": "MODIFIED", "object": _obj("a", "6")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}},
            ],
            [{"type": "ERROR", "object": {"code": 410, "message": "too old"}}],
            ApiError(500, "boom"),
        ],
    )
    informer = Informer(
        client,  # type: ignore[arg-type]
        WatchedKind("things", "/things", "x=y"),
        sink,
        backoff=(0.01,),
    )

    async def main() -> None:
        task = asyncio.create_task(informer.run())
        for _ in range(200):
            if informer.lists >= 3 and len(client.calls) >= 8:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert seen == [
        (("ns", "a"), "1"),
        (("ns", "b"), "2"),
        (("ns", "a"), "6"),
        # re-list after 410: a changed back to 1 (we had 6), b vanished, c is new
        (("ns", "a"), "1"),
        (("ns", "c"), "9"),
        (("ns", "b"), None),
    ]
    watches = [p for kind, p in client.calls if kind == "watch"]
    assert watches[0]["resourceVersion"] == "5" and watches[0]["fieldSelector"] == "x=y"
    assert watches[1]["resourceVersion"] == "7"  # resumed after the bookmark
    assert watches[2]["resourceVersion"] == "10"  # after the re-list
    assert informer.lists == 3  # the 500 made it list again
