from __future__ import annotations

import datetime as dt

from halfclose.api import Condition, condition_changes, set_condition

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(hours=1)


def test_transition_time_moves_only_on_status_change() -> None:
    conds = set_condition(
        (), type_="Ready", status="False", reason="NoMatchingPods", message="none", now=T0
    )
    same = set_condition(
        conds, type_="Ready", status="False", reason="AllPodsClaimed", message="other", now=T1
    )
    assert same[0].last_transition_time == "2025-01-01T00:00:00Z"
    assert same[0].reason == "AllPodsClaimed"
    flipped = set_condition(
        same, type_="Ready", status="True", reason="Applied", message="", now=T1
    )
    assert flipped[0].last_transition_time == "2025-01-01T01:00:00Z"


def test_order_kept_and_new_types_appended() -> None:
    conds = set_condition((), type_="Accepted", status="True", reason="Valid", message="", now=T0)
    conds = set_condition(conds, type_="Ready", status="True", reason="Applied", message="", now=T0)
    conds = set_condition(
        conds, type_="Accepted", status="False", reason="InvalidSpec", message="x", now=T1
    )
    assert [c.type for c in conds] == ["Accepted", "Ready"]


def test_changes_ignore_message_only_updates() -> None:
    before = (
        Condition(
            type="Ready",
            status="True",
            reason="Applied",
            message="3 pods",
            last_transition_time="2025-01-01T00:00:00Z",
        ),
    )
    after_msg = set_condition(
        before, type_="Ready", status="True", reason="Applied", message="4 pods", now=T1
    )
    assert condition_changes(before, after_msg) == []
    after_flip = set_condition(
        before, type_="Ready", status="False", reason="NoMatchingPods", message="", now=T1
    )
    (change,) = condition_changes(before, after_flip)
    assert change.previous == before[0] and change.condition.status == "False"
    new = set_condition(
        before, type_="Overlapping", status="True", reason="OverlapLost", message="", now=T1
    )
    assert [c.condition.type for c in condition_changes(before, new)] == ["Overlapping"]
