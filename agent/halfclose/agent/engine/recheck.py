"""The proof again for a few known sockets, without a scan of the netns (the agent's fast path).

The agent predicts when each at-risk socket's leak becomes provable (its NAT
entry's expiry, part 4's bar: ``daemon/schedule.py``), and a conntrack UPDATE
into CLOSE_WAIT names a proxied connection's reply tuple before any scan saw
its socket.  At that moment only those sockets need judging.  A scan would
dump the netns's half-closed sockets, and a sock_diag dump walks the host's
whole TCP hash, every netns's sockets (~10 ms per family with 110 pods):
here each socket is read by one GET (a hash lookup), many per ``send()``.

The proof is the scan's, on fresh reads: the socket re-read (by tuple and
cookie; by tuple alone for a socket only an event named, whose cookie the
answer then carries), part 2 from the netns's rules as the scan caches them,
its NAT entry looked up now, this netns's half-closed timeouts, and
``core.classify`` judging them.  Where the scan would need more evidence
than that (rules unreadable, a capture only DST_NAT entries show, a socket
an event named that is not there), ``recheck`` answers None: the caller
scans the netns instead.  A kill of what it finds still goes through the
plan and the kill's own re-check (``plan.recheck_kill``).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence

from halfclose.agent.core.classify import classify, is_candidate
from halfclose.agent.core.model import SocketRecord
from halfclose.agent.engine.nogc import gc_paused
from halfclose.agent.engine.scan import Scanner, ScanResult, ScanSettings, capture_evidence

# A socket named by its tuple only (a conntrack event): the kernel then skips
# the cookie check of a GET (INET_DIAG_NOCOOKIE in both halves), and the
# answer carries the socket's real cookie, which every later step uses.
NO_COOKIE = (1 << 64) - 1
# The socket asked for is not there (ESTALE: its tuple names another socket now).
GONE = frozenset({errno.ENOENT, errno.ESTALE})


def probe(sock: SocketRecord) -> bool:
    """Is this a tuple-only record (its cookie not known yet)?"""
    return sock.cookie == NO_COOKIE


def recheck(
    scanner: Scanner, sockets: Sequence[SocketRecord], settings: ScanSettings
) -> ScanResult | None:
    """Findings for ``sockets`` as they are now, judged as a scan judges them.

    None when only a scan can decide (see the module docstring).  Sockets
    that are gone, or no longer candidates (the app closed, a timewait
    socket under the tuple), are simply absent from the findings.
    """
    with gc_paused():
        return _recheck(scanner, sockets, settings)


def _recheck(
    scanner: Scanner, sockets: Sequence[SocketRecord], settings: ScanSettings
) -> ScanResult | None:
    started = time.perf_counter()
    rules = scanner.rules(settings)
    if settings.capture_ports is not None:
        ports = settings.capture_ports
    elif rules.found is not None and not rules.incomplete:
        ports = rules.found.ports
    else:
        return None  # the scan adds DST_NAT entries' evidence: only it can judge
    capture = capture_evidence(rules.found, settings.capture_ports, None)
    now: list[SocketRecord] = []
    for asked, got in zip(sockets, scanner.sockdiag.get_many(sockets), strict=True):
        if isinstance(got, int) and got not in GONE:
            raise OSError(got, f"sock_diag GET failed for {asked.local}<-{asked.peer}")
        if got is None or isinstance(got, int):  # ENOENT; ESTALE: the tuple names another
            if probe(asked):
                return None  # named by an event but not found by its tuple: scan
            continue  # gone
        if got.local.port != asked.local.port or got.peer.port != asked.peer.port:
            return None  # not the socket asked for: never judge a guess
        now.append(got)
    candidates = [s for s in now if is_candidate(s, ports, capture)]
    if any(capture.proves(s) is None for s in candidates):
        return None  # only DST_NAT entries could show this capture: the scan reads them
    by_cookie = scanner.conntrack.lookup_sockets(candidates) if candidates else {}
    evidence, warnings = scanner.evidence(capture, by_cookie, settings)
    findings = classify(candidates, ports, evidence, {}, settings.min_idle_seconds)
    return ScanResult(
        netns=scanner.handle.label,
        capture_ports=tuple(sorted(ports)),
        sockets_examined=len(now),
        duration_seconds=time.perf_counter() - started,
        findings=findings,
        port_origins=rules.found,
        warnings=warnings,
        timeouts=evidence.timeouts,
    )
