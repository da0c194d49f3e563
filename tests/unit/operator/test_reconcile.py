"""The reconcile pass: only the leader writes, writes only what changed, cleans up."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from prometheus_client import CollectorRegistry

from halfclose.operator.client import ApiError
from halfclose.operator.inventory import Inventory
from halfclose.operator.metrics import OperatorMetrics
from halfclose.operator.reconcile import LEGACY_FINALIZER, POLICIES_PATH, Reconciler
from halfclose.operator.settings import OperatorSettings


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.version = 100

    async def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> Any:
        self.calls.append((method, path, body))
        if method == "DELETE" and path.endswith("/gone"):
            raise ApiError(404, "not found")
        if method == "PATCH" and path.endswith("/status"):
            self.version += 1
            return {
                "metadata": {"uid": "uid-p", "resourceVersion": str(self.version)},
                "status": body["status"],
            }
        return {}

    def writes(self, method: str, suffix: str = "") -> list[str]:
        return [p for m, p, _ in self.calls if m == method and p.endswith(suffix)]


def _policy(**meta: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "uid": "uid-p",
            "generation": 1,
            "resourceVersion": "10",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            **meta,
        },
        "spec": {"namespaces": ["shop"]},
    }


def _report(pod: str, policy: str = "p", leaked: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": pod},
        "spec": {"podName": pod, "podUID": "u", "nodeName": "n1", "policy": policy},
        "status": {"leaked": leaked},
    }


def _peer(priority: int) -> dict[str, Any]:
    return {"priority": priority, "lifetime": 60, "lastseen": dt.datetime.now(dt.UTC).isoformat()}


def _reconciler(inv: Inventory, client: FakeClient, priority: int = 10) -> Reconciler:
    async def ready() -> None:
        return None

    return Reconciler(
        settings=OperatorSettings(peering="halfclose", priority=priority),
        inventory=inv,
        client=client,  # type: ignore[arg-type]
        metrics=OperatorMetrics(CollectorRegistry()),
        identity="me",
        ready=ready,
    )


def test_only_the_leader_writes_and_only_changes() -> None:
    inv, client = Inventory(), FakeClient()
    inv.on_namespace(("", "shop"), {"metadata": {"name": "shop"}})
    inv.on_pod(("shop", "cart"), {"metadata": {"namespace": "shop", "name": "cart"}})
    inv.on_policy(("", "p"), _policy())
    inv.on_report(("shop", "cart"), _report("cart", leaked=3))
    rec = _reconciler(inv, client)

    async def main() -> None:
        inv.on_peering(("", "halfclose"), {"status": {"me": _peer(10), "other": _peer(20)}})
        assert not await rec.reconcile()
        assert client.calls == []  # a standby writes nothing
        inv.on_peering(("", "halfclose"), {"status": {"me": _peer(10)}})
        assert await rec.reconcile()
        assert client.writes("PATCH", "/status") == [f"{POLICIES_PATH}/p/status"]
        assert inv.policies["p"].status["leakedNow"] == 3  # known before the watch says so
        events = client.writes("POST")
        assert events and all(p == "/api/v1/namespaces/default/events" for p in events)
        # Nothing moved: no pass at all; a report moved: one write, no new Events.
        calls = len(client.calls)
        assert not await rec.reconcile()
        inv.on_report(("shop", "cart"), _report("cart", leaked=5))
        assert await rec.reconcile()
        assert len(client.calls) == calls + 1
        assert inv.policies["p"].status["leakedNow"] == 5

    asyncio.run(main())


def test_a_deleted_policys_reports_go_unless_they_changed_policy() -> None:
    inv, client = Inventory(), FakeClient()
    inv.on_policy(("", "p"), _policy())
    inv.on_report(("shop", "a"), _report("a"))
    inv.on_report(("shop", "b"), _report("b"))
    inv.on_report(("shop", "gone"), _report("gone"))
    inv.on_policy(("", "p"), None)
    # Before the cleanup ran, b's agent re-made b's report under another policy.
    inv.on_report(("shop", "b"), _report("b", policy="q"))
    rec = _reconciler(inv, client)
    inv.on_peering(("", "halfclose"), {"status": {"me": _peer(10)}})
    asyncio.run(rec.reconcile())
    assert sorted(client.writes("DELETE")) == [
        "/apis/halfclose.io/v1alpha1/namespaces/shop/halfclosereports/a",
        "/apis/halfclose.io/v1alpha1/namespaces/shop/halfclosereports/gone",  # 404: fine
    ]
    assert inv.deleted_policies == set()


def test_an_older_operators_finalizer_is_removed() -> None:
    inv, client = Inventory(), FakeClient()
    inv.on_policy(
        ("", "p"),
        _policy(
            finalizers=[LEGACY_FINALIZER, "example.com/keep"],
            annotations={"halfclose.io/last-handled-configuration": "{}", "a": "b"},
        ),
    )
    rec = _reconciler(inv, client)
    inv.on_peering(("", "halfclose"), {"status": {"me": _peer(10)}})
    asyncio.run(rec.reconcile())
    method, path, body = client.calls[0]
    assert (method, path) == ("PATCH", "/apis/halfclose.io/v1alpha1/halfclosepolicies/p")
    assert body == {
        "metadata": {
            "resourceVersion": "10",
            "finalizers": ["example.com/keep"],
            "annotations": {"halfclose.io/last-handled-configuration": None},
        }
    }


def test_a_cancel_that_meets_a_change_still_stops_the_loop() -> None:
    """Shutdown cancels the loop while a watch event may set ``changed`` in the same
    loop turn (kopf's peering PATCH on exit does).  The cancel must win: Python
    3.11's ``asyncio.wait_for`` returned the event's result and dropped it, so the
    operator never stopped (a CI run waited 30 s for it)."""

    async def main() -> str:
        rec = _reconciler(Inventory(), FakeClient())
        task = asyncio.create_task(rec.run())
        for _ in range(20):  # reach the idle wait for a change
            await asyncio.sleep(0)
        rec.notify()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            task.cancel()  # the fixed loop never gets here; the old one needs a second cancel
            await asyncio.gather(task, return_exceptions=True)
            return "still running"
        return "cancelled" if task.cancelled() else f"ended: {task.exception()!r}"

    assert asyncio.run(main()) == "cancelled"
