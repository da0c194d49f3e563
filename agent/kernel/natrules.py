"""Capture ports from a netns's own interception rules (design.md §2).

A sidecar is fed by REDIRECT (nat table) or TPROXY (mangle table) rules; their
target ports are the ports whose half-closed sockets we judge.  Rules live in
one of three places and a pod may use any of them, so all are read:

- iptables-nft  (``iptables-save``, ``ip6tables-save``)
- iptables-legacy (``iptables-legacy-save``, ``ip6tables-legacy-save``)
- native nftables (``nft -j list ruleset``: ``redirect to :P``, ``tproxy to :P``)

Each tool runs inside the target netns (nsenter on our pinned netns fd), in
parallel: they are independent and each costs a process start.  A tool that is
missing or fails is recorded, not fatal; only when *no* source could be read is
that the user's problem (they can pass ``--capture-ports``).

The parsers are pure functions over the tools' text so they are unit-tested on
saved output.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.errors import UserError

IPTABLES_SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("iptables-nft", ("iptables-save",)),
    ("ip6tables-nft", ("ip6tables-save",)),
    ("iptables-legacy", ("iptables-legacy-save",)),
    ("ip6tables-legacy", ("ip6tables-legacy-save",)),
)
NFT_SOURCE = ("nft", ("nft", "-j", "list", "ruleset"))
TABLES = frozenset({"nat", "mangle"})

# A wide range is almost certainly not a sidecar; refuse to blow it up into
# thousands of "capture ports" (which would make every socket a candidate).
MAX_RANGE = 64

_TARGET = re.compile(r"-j\s+(REDIRECT|TPROXY)\b(.*)$")
_PORT_OPT = re.compile(r"--(?:to-ports?|on-port)\s+(\d+)(?:[-:](\d+))?")


@dataclass(frozen=True, slots=True)
class PortOrigin:
    """Where a capture port was found: ``iptables-nft nat/ISTIO_REDIRECT REDIRECT``."""

    source: str
    table: str
    chain: str
    target: str

    def __str__(self) -> str:
        return f"{self.source} {self.table}/{self.chain} {self.target}"


@dataclass(frozen=True, slots=True)
class CapturePorts:
    ports: frozenset[int]
    origins: Mapping[int, tuple[PortOrigin, ...]] = field(default_factory=dict)
    sources_read: tuple[str, ...] = ()
    sources_failed: Mapping[str, str] = field(default_factory=dict)  # source -> why
    # Tools not installed in the netns's view: normal (node images differ), and
    # then that rule style cannot be in use there either.
    sources_missing: tuple[str, ...] = ()
    # TCP TPROXY target ports (mangle): no NAT, so only a proof together with
    # ``drops_invalid`` (design.md §2 part 2: the late FIN is dropped as INVALID).
    tproxy_ports: frozenset[int] = frozenset()
    # A rule drops conntrack-INVALID TCP packets (Istio's DROP_INVALID).
    drops_invalid: bool = False

    @property
    def unreadable(self) -> Mapping[str, str]:
        """Sources that exist but could not be read: rules there are invisible to us."""
        return {k: v for k, v in self.sources_failed.items() if k not in self.sources_missing}


def _expand(lo: int, hi: int | None) -> range:
    hi = lo if hi is None else hi
    if not (0 < lo <= hi <= 65535) or hi - lo >= MAX_RANGE:
        return range(0)
    return range(lo, hi + 1)


def parse_iptables_save(text: str, source: str) -> Iterator[tuple[int, PortOrigin]]:
    """(port, origin) for REDIRECT/TPROXY rules in the nat and mangle tables."""
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
            continue
        if table not in TABLES or not line.startswith("-A "):
            continue
        m = _TARGET.search(line)
        if not m:
            continue
        opt = _PORT_OPT.search(m.group(2))
        if not opt:
            continue  # REDIRECT without --to-ports keeps the port: nothing captured
        chain = line.split()[1]
        origin = PortOrigin(source, table, chain, m.group(1))
        hi = int(opt.group(2)) if opt.group(2) else None
        for port in _expand(int(opt.group(1)), hi):
            yield port, origin


def _nft_ports(value: Any) -> range:
    if isinstance(value, int):
        return _expand(value, None)
    if isinstance(value, dict) and isinstance(value.get("range"), list):
        lo, hi = value["range"]
        if isinstance(lo, int) and isinstance(hi, int):
            return _expand(lo, hi)
    return range(0)  # maps/expressions: not a fixed port


def parse_nft_json(text: str, source: str = "nft") -> Iterator[tuple[int, PortOrigin]]:
    """(port, origin) for ``redirect``/``tproxy`` statements in ``nft -j list ruleset``."""
    doc = json.loads(text) if text.strip() else {}
    for item in doc.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        for expr in rule.get("expr", []):
            if not isinstance(expr, dict):
                continue
            for stmt in ("redirect", "tproxy"):
                body = expr.get(stmt)
                if isinstance(body, dict) and "port" in body:
                    origin = PortOrigin(
                        source,
                        f"{rule.get('family', '?')} {rule.get('table', '?')}",
                        str(rule.get("chain", "?")),
                        stmt,
                    )
                    for port in _nft_ports(body["port"]):
                        yield port, origin


def merge(found: Iterable[tuple[int, PortOrigin]]) -> dict[int, tuple[PortOrigin, ...]]:
    origins: dict[int, list[PortOrigin]] = {}
    for port, origin in found:
        seen = origins.setdefault(port, [])
        if origin not in seen:
            seen.append(origin)
    return {p: tuple(o) for p, o in sorted(origins.items())}


def _read(handle: NetnsHandle, argv: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    try:
        proc = handle.run_command(argv, timeout=timeout)
    except FileNotFoundError:
        return False, "nsenter not found"
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g}s"
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        # nsenter reports a missing tool as "failed to execute X: No such file".
        return False, first
    return True, proc.stdout


def _tool_missing(why: str) -> bool:
    return why == "nsenter not found" or ("failed to execute" in why and "No such file" in why)


def detect(handle: NetnsHandle, timeout: float = 10.0) -> CapturePorts:
    """Read every rule source in ``handle``'s netns; UserError if none was readable."""
    sources = (*IPTABLES_SOURCES, NFT_SOURCE)
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        results = list(pool.map(lambda s: _read(handle, s[1], timeout), sources))
    found: list[tuple[int, PortOrigin]] = []
    read: list[str] = []
    failed: dict[str, str] = {}
    for (name, _argv), (ok, out) in zip(sources, results, strict=True):
        if not ok:
            failed[name] = out
            continue
        try:
            if name == "nft":
                found.extend(parse_nft_json(out, name))
            else:
                found.extend(parse_iptables_save(out, name))
        except (ValueError, KeyError, TypeError) as exc:
            failed[name] = f"unparsable output: {exc}"
            continue
        read.append(name)
    if not read:
        why = "; ".join(f"{k}: {v}" for k, v in failed.items())
        raise UserError(f"cannot read NAT rules in {handle.label} ({why}); pass --capture-ports")
    origins = merge(found)
    missing = tuple(k for k, why in failed.items() if _tool_missing(why))
    return CapturePorts(frozenset(origins), origins, tuple(read), failed, missing)
