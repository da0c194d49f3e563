"""Kills at ``ss -K``'s speed, with the same per-socket safety (docs/remediation.md).

Each kill is preceded by the re-check ``plan.recheck_kill`` holds (the proof's
parts again, on the socket and entry as they are *now*): the socket re-read by
tuple and cookie, its NAT entry looked up again by the normalized reply tuple.
Only then ``SOCK_DESTROY``, keyed by the re-read cookie, so it can only hit that
socket (docs/detection.md).  What changes is the transport: the sockets are
re-read by one state-filtered dump (matched by cookie; a socket the dump does
not show is asked for alone, so "gone" and "state changed" stay apart), then
per chunk of a few hundred, all conntrack GETs go out in one ``send()`` and all
destroys in another (answers matched by sequence number).  The NAT entry is
re-read within one chunk of the destroy (milliseconds); the socket's own
state within one kill call (measured: 0.4 s for 20,000) -- its cookie keeps
the destroy on that very socket, and a packet that moved in between revives
the entry (loose pickup), which the per-chunk GET sees.

The proxy's upstream legs are not waited for here: a proxy closes them a
moment after its downstream goes, and a sleep in the agent's loop thread
delays every other netns.  ``close_wait_baseline`` (before the kills, one dump)
and ``verify_upstreams`` (whenever the caller schedules it, one dump) do that.
"""

from __future__ import annotations

import errno
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from halfclose.agent.core.model import ConntrackEntry, Outcome, SocketRecord, TcpState
from halfclose.agent.core.plan import Decision, Op, SkipReason, recheck_kill
from halfclose.agent.engine.nogc import gc_paused
from halfclose.agent.kernel.conntrack import Conntrack
from halfclose.agent.kernel.sockdiag import SockDiag

# The socket is gone already: the kernel has nothing to destroy.
GONE = frozenset({errno.ENOENT, errno.ESTALE})
# A proxy closes its upstream leg within milliseconds of the downstream's
# destruction; check then (and again later while legs remain open).
UPSTREAM_DUE_SECONDS = 0.1
# Sockets re-checked and destroyed per round (each step one send()).
KILL_CHUNK = 512

# On Linux ENOTSUP == EOPNOTSUPP; the kernel's name for what SOCK_DESTROY
# answers without CONFIG_INET_DIAG_DESTROY is EOPNOTSUPP.
_PREFERRED_NAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP"}


def errno_name(err: int | None) -> str:
    if err is None:
        return "EUNKNOWN"
    return _PREFERRED_NAMES.get(err) or errno.errorcode.get(err, f"errno {err}")


@dataclass(frozen=True, slots=True)
class KillResult:
    """What happened to one kill decision."""

    outcome: Outcome  # KILLED, SKIPPED or FAILED
    reason: SkipReason | None = None  # SKIPPED: why (DRY_RUN for a dry run)
    error: str | None = None  # FAILED: the errno name


# Results shared by every decision they describe (frozen: one object each,
# not 20,000 at field scale).
_KILLED = KillResult(Outcome.KILLED)
_ALREADY_GONE = KillResult(Outcome.SKIPPED, SkipReason.ALREADY_GONE)
_DRY_RUN = KillResult(Outcome.SKIPPED, SkipReason.DRY_RUN)
_SKIPPED = {reason: KillResult(Outcome.SKIPPED, reason) for reason in SkipReason}


def kill(
    diag: SockDiag,
    conntrack: Conntrack,
    decisions: Sequence[Decision],
    capture_ports: Collection[int],
    *,
    dry_run: bool = False,
    chunk: int = KILL_CHUNK,
) -> list[KillResult]:
    """Re-check and destroy every decision's socket; one result per decision, in order."""
    if any(d.op is not Op.KILL for d in decisions):
        raise ValueError("kill() takes Op.KILL decisions only")
    with gc_paused():
        return _kill(diag, conntrack, decisions, frozenset(capture_ports), dry_run, chunk)


def _kill(  # noqa: PLR0917 (private)
    diag: SockDiag,
    conntrack: Conntrack,
    decisions: Sequence[Decision],
    ports: frozenset[int],
    dry_run: bool,
    chunk: int,
) -> list[KillResult]:
    try:
        # The sockets as they are now: one dump for all (by cookie).
        now = diag.reread([d.finding.socket for d in decisions])
    except OSError as exc:
        # A failed re-check must never read as "safe to kill".
        return [KillResult(Outcome.FAILED, error=errno_name(exc.errno))] * len(decisions)
    out: list[KillResult] = []
    for start in range(0, len(decisions), chunk):
        end = start + chunk
        out.extend(
            _kill_chunk(diag, conntrack, decisions[start:end], now[start:end], ports, dry_run)
        )
    return out


def _kill_chunk(  # noqa: PLR0917 (private; the chunk's parts)
    diag: SockDiag,
    conntrack: Conntrack,
    decisions: Sequence[Decision],
    now: Sequence[SocketRecord | int | None],
    ports: frozenset[int],
    dry_run: bool,
) -> list[KillResult]:
    results: list[KillResult | None] = [None] * len(decisions)
    present: list[tuple[int, SocketRecord]] = []
    for i, current in enumerate(now):
        if isinstance(current, int):
            results[i] = KillResult(Outcome.FAILED, error=errno_name(current))
        elif current is not None:
            present.append((i, current))
    entries: dict[int, ConntrackEntry | None] = {}
    if present:
        try:
            # Looked up by the planned socket's tuple, as the scan did (the
            # re-read one has the same tuple: same cookie, or recheck refuses).
            # One GET each, whatever the count: each answer is the entry as it
            # is just before this chunk's destroys (a dump would be as old as
            # its walk of the whole hash).
            entries = conntrack.lookup_sockets_get(
                [decisions[i].finding.socket for i, _ in present]
            )
        except OSError as exc:
            failed = KillResult(Outcome.FAILED, error=errno_name(exc.errno))
            for i, _ in present:
                results[i] = failed
            present = []
    doomed: list[tuple[int, SocketRecord]] = []
    for i, current in [(i, None) for i, c in enumerate(now) if c is None] + present:
        if results[i] is not None:
            continue
        decision = decisions[i]
        entry_now = entries.get(decision.finding.socket.cookie) if current is not None else None
        reason = recheck_kill(decision, current, entry_now, ports)
        if reason is not None:
            results[i] = _SKIPPED[reason]
        elif dry_run:
            results[i] = _DRY_RUN
        else:
            assert current is not None  # recheck_kill returns ALREADY_GONE otherwise
            doomed.append((i, current))
    if doomed:
        try:
            # The re-read records carry the same cookies (the re-check proved
            # it): SOCK_DESTROY can only hit these sockets, never a listener.
            errs = diag.destroy_many([current for _, current in doomed])
        except OSError as exc:
            errs = [exc.errno or errno.EIO] * len(doomed)
        for (i, _), err in zip(doomed, errs, strict=True):
            if err == 0:
                results[i] = _KILLED
            elif err in GONE:
                results[i] = _ALREADY_GONE
            else:
                results[i] = KillResult(Outcome.FAILED, error=errno_name(err))
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


# -- the upstream legs, verified later ------------------------------------------


def _close_wait_cookies(
    diag: SockDiag,
    uids: frozenset[int],
    capture_ports: frozenset[int],
    exclude: frozenset[tuple[object, object]] = frozenset(),
) -> frozenset[int]:
    """Cookies of the CLOSE_WAIT sockets that may be the proxy's upstream legs (one dump)."""

    def keep(_state: int, sport: int, _dport: int) -> bool:
        return sport not in capture_ports

    _, socks = diag.dump([TcpState.CLOSE_WAIT], keep)
    return frozenset(
        s.cookie
        for s in socks
        if s.uid in uids
        and not s.orphan
        and (s.local.normalized(), s.peer.normalized()) not in exclude
    )


def close_wait_baseline(
    diag: SockDiag, decisions: Sequence[Decision], capture_ports: Collection[int]
) -> frozenset[int] | None:
    """Before the kills: the CLOSE_WAIT sockets of the killed sockets' holders (uids).

    Needed only for kills without a known upstream leg, which are checked by
    count.  The other end of a connection being killed, when it lives in this
    netns (a client of a plain server), is no upstream leg and is left out.
    None when the dump failed (then nothing is claimed closed).
    """
    uids = frozenset(d.finding.socket.uid for d in decisions)
    ends = frozenset(
        (d.finding.socket.peer.normalized(), d.finding.socket.local.normalized()) for d in decisions
    )
    try:
        return _close_wait_cookies(diag, uids, frozenset(capture_ports), ends)
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """What one verification saw of the killed sockets' upstream legs."""

    closed: frozenset[int]  # cookies of the paired legs no longer in CLOSE_WAIT
    unpaired_closed: int  # closed candidates for the kills without a known leg
    unpaired_candidates: int  # candidates there were (0: no proxy upstream to watch)


def verify_upstreams(
    diag: SockDiag,
    *,
    paired_legs: Sequence[SocketRecord],
    unpaired_kills: int,
    uids: frozenset[int],
    baseline: frozenset[int] | None,
    capture_ports: Collection[int],
) -> UpstreamStatus:
    """One CLOSE_WAIT dump: which upstream legs have closed since the kills.

    A paired leg is closed when its cookie is no longer among the CLOSE_WAIT
    sockets (gone, or moved on to LAST_ACK).  Unpaired kills are checked by
    count against ``baseline``.  Raises OSError when the dump fails: then
    nothing is verified yet, and nothing may be claimed.
    """
    ports = frozenset(capture_ports)
    leg_uids = uids | {leg.uid for leg in paired_legs}
    still = _close_wait_cookies(diag, leg_uids, ports)
    paired = frozenset(leg.cookie for leg in paired_legs)
    closed = paired - still
    if baseline is None:
        return UpstreamStatus(closed, 0, 0)
    candidates = baseline - paired
    gone = len(candidates - still)
    return UpstreamStatus(closed, min(gone, unpaired_kills), len(candidates))
