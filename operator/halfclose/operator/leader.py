"""Is this replica the one that writes?  Read from kopf's peering object.

kopf keeps the peering (every replica announces itself with its priority in
the ClusterKopfPeering status, refreshed before its ``lifetime`` runs out,
and removes itself on a clean exit) and pauses its own watches when a peer
outranks it.  The operator's own list/watch loop is not kopf's, so it reads
the same object and applies kopf's rule: a replica leads while it is
announced and alive and no other live peer has a priority as high as its
own (equal priorities pause everyone, as kopf does).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any


def _alive(info: Mapping[str, Any], now: dt.datetime) -> bool:
    seen = info.get("lastseen")
    if not seen:
        return True  # kopf counts a peer without lastseen as just seen
    try:
        lastseen = dt.datetime.fromisoformat(str(seen).replace("Z", "+00:00"))
    except ValueError:
        return False
    if lastseen.tzinfo is None:
        lastseen = lastseen.replace(tzinfo=dt.UTC)
    lifetime = dt.timedelta(seconds=int(info.get("lifetime") or 60))
    return lastseen + lifetime > now


def leads(
    peers: Mapping[str, Mapping[str, Any]], identity: str, priority: int, now: dt.datetime
) -> bool:
    """kopf's pause rule, from the peering object's status (identity -> peer)."""
    own = peers.get(identity)
    if own is None or not _alive(own, now):
        return False
    return not any(
        int(info.get("priority") or 0) >= priority
        for other, info in peers.items()
        if other != identity and _alive(info, now)
    )
