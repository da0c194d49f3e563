"""The one reconcile loop: every policy's status from the inventory, debounced.

Level-based: each pass recomputes the status of every policy from what the
inventory holds (creation, update, resume after a restart, changes of pods,
namespaces, reports and other policies all take this one path) and patches a
status only where it differs from what the server stores.  Passes run when
the inventory moved, at most one per ``debounce_seconds``, so however many
reports change in between a policy gets at most one status write per
interval.  Nothing runs before every list/watch has its first listing (the
first status after a start is computed from complete data), and only the
leading replica writes.

There are no kopf handlers on policies -- no timer, hence no kopf
finalizer: deleting a policy, or the CRD, never waits for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from halfclose.api import (
    GROUP,
    POLICY_KIND,
    POLICY_PLURAL,
    READY,
    REPORT_KIND,
    REPORT_PLURAL,
    VERSION,
    PolicyStatus,
    encode,
    is_true,
)
from halfclose.api.schema import SchemaError, decode
from halfclose.operator.assignment import Assignment
from halfclose.operator.client import MERGE_PATCH, ApiError, KubeClient
from halfclose.operator.events import EVENTS_PATH, event_body
from halfclose.operator.inventory import Inventory, PolicyRecord
from halfclose.operator.leader import leads
from halfclose.operator.metrics import OperatorMetrics
from halfclose.operator.settings import OperatorSettings
from halfclose.operator.status import compute_status, events_for

log = logging.getLogger("halfclose.operator")

# The status keys the operator owns: a key it no longer sets is removed.
STATUS_KEYS = tuple(encode(PolicyStatus(observed_generation=0, conditions=())).keys())
POLICIES_PATH = f"/apis/{GROUP}/{VERSION}/{POLICY_PLURAL}"
# What kopf left on policies when the operator had a kopf timer (before issue 10): its
# finalizer would block every deletion for ever now that nothing removes it.
LEGACY_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"
LEGACY_ANNOTATIONS = (f"{GROUP}/last-handled-configuration", f"{GROUP}/status")
# How often leadership is re-read without any change (a dead leader expires by time).
_IDLE_RECHECK_SECONDS = 1.0
_API_ERRORS = (ApiError, OSError, TimeoutError)


def stored_status(raw: Mapping[str, Any]) -> PolicyStatus:
    try:
        return decode(PolicyStatus, dict(raw), "status")
    except SchemaError:
        return PolicyStatus()


def report_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{REPORT_PLURAL}/{name}"


@dataclass
class Reconciler:
    settings: OperatorSettings
    inventory: Inventory
    client: KubeClient
    metrics: OperatorMetrics
    identity: str
    ready: Callable[[], Awaitable[None]]  # resolves once every informer has listed
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    readiness: dict[str, bool] = field(default_factory=dict)
    leading: bool = False
    passes: int = 0
    _done_revision: int = -1
    _retry: bool = False

    def notify(self) -> None:
        self.changed.set()

    def is_leader(self, now: dt.datetime) -> bool:
        if self.settings.peering is None:
            return True
        return leads(self.inventory.peers, self.identity, self.settings.priority, now)

    async def run(self) -> None:
        await self.ready()
        log.info(
            "listed %d namespaces, %d pods, %d policies, %d reports",
            len(self.inventory.namespaces),
            len(self.inventory.pods),
            len(self.inventory.policies),
            len(self.inventory.reports),
        )
        last = -float("inf")
        while True:
            delay = last + self.settings.debounce_seconds - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self._retry:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the
                # result when the event is set in the same loop turn as a cancel, and
                # the cancel is lost -- the operator then never stops (seen in CI).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                        max(self.settings.debounce_seconds, _IDLE_RECHECK_SECONDS)
                    ):
                        await self.changed.wait()
            self.changed.clear()
            started = time.monotonic()
            if await self.reconcile():
                last = started  # only a pass that computed statuses uses up the interval

    async def reconcile(self) -> bool:
        """One pass: clean up after deleted policies, then every policy's status.

        Returns whether statuses were computed (leading, and something moved).
        """
        now = dt.datetime.now(dt.UTC)
        leading = self.is_leader(now)
        if leading != self.leading:
            log.info("%s", "leading: writing statuses" if leading else "standing by")
            self.leading = leading
            self._done_revision = -1
        if not leading:
            self._retry = False
            return False
        ok = await self._clean_up_deleted_policies()
        revision = self.inventory.revision
        computed = revision != self._done_revision
        if computed:
            self.passes += 1
            assignment = self.inventory.assignment()
            for name, record in list(self.inventory.policies.items()):
                ok = await self._reconcile_policy(name, record, assignment, now) and ok
            for gone in self.readiness.keys() - self.inventory.policies.keys():
                del self.readiness[gone]
                self.metrics.forget_policies([gone])
            self.metrics.set_policy_readiness(self.readiness)
            if ok:
                self._done_revision = revision
            log.debug("pass %d at revision %d: ok=%s", self.passes, revision, ok)
        self._retry = not ok  # a failed write is retried next interval, change or not
        return computed or not ok

    async def _reconcile_policy(
        self, name: str, record: PolicyRecord, assignment: Assignment, now: dt.datetime
    ) -> bool:
        migrated = await self._drop_legacy_finalizer(name, record)
        previous = stored_status(record.status)
        try:
            status = compute_status(
                record.entry,
                assignment.of(name),
                self.inventory.tally(name).aggregate(),
                previous,
                now,
            )
        except Exception:
            self.metrics.reconcile_total.labels(kind=POLICY_KIND, result="error").inc()
            log.exception("policy %s: computing the status failed", name)
            return False
        wanted = encode(status)
        current = {k: v for k, v in record.status.items() if k in STATUS_KEYS}
        if wanted != current:
            patch = {"status": {key: wanted.get(key) for key in STATUS_KEYS}}
            try:
                body = await self.client.request(
                    "PATCH",
                    f"{POLICIES_PATH}/{name}/status",
                    body=patch,
                    content_type=MERGE_PATCH,
                )
            except _API_ERRORS as exc:
                if isinstance(exc, ApiError) and exc.status == 404:
                    return True  # deleted meanwhile; its watch event follows
                self.metrics.reconcile_total.labels(kind=POLICY_KIND, result="error").inc()
                log.warning("policy %s: writing the status failed: %s", name, exc)
                return False
            self.metrics.status_writes_total.inc()
            self.inventory.status_written(name, body)
            for event in events_for(previous.conditions, status.conditions):
                log.info("policy %s: %s: %s", name, event.reason, event.message)
                try:
                    await self.client.request(
                        "POST",
                        EVENTS_PATH,
                        body=event_body(record.reference, event, self.identity, now),
                    )
                except _API_ERRORS as exc:
                    log.warning("policy %s: posting an Event failed: %s", name, exc)
        self.metrics.reconcile_total.labels(kind=POLICY_KIND, result="ok").inc()
        self.readiness[name] = is_true(status.conditions, READY)
        self.metrics.set_policy_totals(name, status.leaked_now, status.killed_total)
        return migrated

    async def _drop_legacy_finalizer(self, name: str, record: PolicyRecord) -> bool:
        """Remove the finalizer (and annotations) an older, kopf-timer operator left.

        Once per policy made before the upgrade; the watch event that follows
        shows the policy without them.
        """
        stale = [a for a in LEGACY_ANNOTATIONS if a in record.annotations]
        if LEGACY_FINALIZER not in record.finalizers and not stale:
            return True
        meta: dict[str, Any] = {
            "resourceVersion": record.resource_version,  # a conflict: retried next pass
            "finalizers": [f for f in record.finalizers if f != LEGACY_FINALIZER] or None,
        }
        if stale:
            meta["annotations"] = dict.fromkeys(stale)
        try:
            await self.client.request(
                "PATCH",
                f"{POLICIES_PATH}/{name}",
                body={"metadata": meta},
                content_type=MERGE_PATCH,
            )
        except _API_ERRORS as exc:
            if isinstance(exc, ApiError) and exc.status == 404:
                return True
            log.warning("policy %s: removing kopf's old finalizer failed: %s", name, exc)
            return False
        log.info("policy %s: removed the finalizer of an older operator version", name)
        return True

    async def _clean_up_deleted_policies(self) -> bool:
        """Delete the reports of deleted policies: nothing acts on them any more.

        Read from the inventory now, not when the policy went: a report
        re-created since for another policy (same pod, same name) stays.
        """
        ok = True
        for name in list(self.inventory.deleted_policies):
            if name in self.inventory.policies:
                self.inventory.deleted_policies.discard(name)
                continue
            deleted = 0
            for namespace, report in list(self.inventory.tally(name).reports):
                try:
                    await self.client.request("DELETE", report_path(namespace, report))
                    deleted += 1
                except _API_ERRORS as exc:
                    if isinstance(exc, ApiError) and exc.status == 404:
                        continue
                    log.warning("deleting report %s/%s failed: %s", namespace, report, exc)
                    ok = False
            if ok:
                self.inventory.deleted_policies.discard(name)
                log.info("policy %s deleted: deleted %d of its reports", name, deleted)
        return ok


def count_report(metrics: OperatorMetrics, readable: bool) -> None:
    metrics.reconcile_total.labels(kind=REPORT_KIND, result="ok" if readable else "error").inc()
