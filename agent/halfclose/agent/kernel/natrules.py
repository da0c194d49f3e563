"""Capture ports from a netns's own interception rules (docs/detection.md, part 2).

A sidecar is fed by REDIRECT or DNAT-to-a-local-port rules (nat) or TPROXY
rules (mangle); their target ports are the ports whose half-closed sockets we
judge.  Rules live in one of three places and a pod may use any of them, so all
are read:

- iptables-nft  (``iptables-save``, ``ip6tables-save``)
- iptables-legacy (``iptables-legacy-save``, ``ip6tables-legacy-save``)
- native nftables (``nft -j list ruleset``: ``redirect``, ``dnat``, ``tproxy``)

Only **TCP** captures count: a leak is a TCP socket, and a rule that matches
UDP only (Istio ambient's ``-p udp --dport 53 -j REDIRECT --to-ports 15053``)
says nothing about TCP sockets on that port.  TPROXY is not NAT (a late FIN is
delivered, not dropped, unless a rule drops conntrack-INVALID packets), so its
ports are kept apart from the NAT ports, along with whether such a drop rule
exists (Istio's DROP_INVALID).

Each tool runs inside the target netns (nsenter on our pinned netns fd), in
parallel: they are independent and each costs a process start.  A tool that is
missing or fails is recorded, not fatal; only when *no* source could be read is
that the user's problem (they can pass ``--capture-ports``).

The parsers are pure functions over the tools' text so they are unit-tested on
saved output (and on the rules the meshes' own generators write:
tests/integration/test_generators.py).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.errors import RulesUnreadable

IPTABLES_SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("iptables-nft", ("iptables-save",)),
    ("ip6tables-nft", ("ip6tables-save",)),
    ("iptables-legacy", ("iptables-legacy-save",)),
    ("ip6tables-legacy", ("ip6tables-legacy-save",)),
)
NFT_SOURCE = ("nft", ("nft", "-j", "list", "ruleset"))
# Tables whose rules can capture: nat (REDIRECT, DNAT) and mangle (TPROXY).
TABLES = frozenset({"nat", "mangle"})
# Tables where a drop of ct-state INVALID packets takes effect (raw runs before
# conntrack, nat never sees INVALID packets).
DROP_TABLES = frozenset({"mangle", "filter", "security"})
# A late FIN from the peer enters through these hooks.
INBOUND_HOOKS = frozenset({"prerouting", "input"})
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

# A wide range is almost certainly not a sidecar; refuse to blow it up into
# thousands of "capture ports" (which would make every socket a candidate).
MAX_RANGE = 64

TPROXY = "tproxy"  # PortOrigin.target (lower-cased) of a TPROXY capture

_PORT_RANGE = re.compile(r"^(\d+)(?:[-:](\d+))?$")


@dataclass(frozen=True, slots=True)
class PortOrigin:
    """Where a capture port was found: ``iptables-nft nat/ISTIO_REDIRECT REDIRECT``."""

    source: str
    table: str
    chain: str
    target: str

    def __str__(self) -> str:
        return f"{self.source} {self.table}/{self.chain} {self.target}"

    @property
    def is_tproxy(self) -> bool:
        return self.target.lower() == TPROXY


@dataclass(frozen=True, slots=True)
class CapturePorts:
    # TCP NAT capture ports: REDIRECT or DNAT to a local port (not TPROXY).
    ports: frozenset[int]
    # Every TCP capture port (NAT and TPROXY) -> the rules that make it one.
    origins: Mapping[int, tuple[PortOrigin, ...]] = field(default_factory=dict)
    sources_read: tuple[str, ...] = ()
    sources_failed: Mapping[str, str] = field(default_factory=dict)  # source -> why
    # Tools not installed in the netns's view: normal (node images differ), and
    # then that rule style cannot be in use there either.
    sources_missing: tuple[str, ...] = ()
    # TCP TPROXY target ports (mangle): no NAT, so only a proof together with
    # ``drops_invalid`` (docs/detection.md part 2: the late FIN is dropped as INVALID).
    tproxy_ports: frozenset[int] = frozenset()
    # A rule drops conntrack-INVALID TCP packets (Istio's DROP_INVALID).
    drops_invalid: bool = False

    @property
    def unreadable(self) -> Mapping[str, str]:
        """Sources that exist but could not be read: rules there are invisible to us."""
        return {k: v for k, v in self.sources_failed.items() if k not in self.sources_missing}


@dataclass(frozen=True, slots=True)
class RuleScan:
    """What one source's rules say: TCP captures, and whether INVALID TCP is dropped."""

    captures: tuple[tuple[int, PortOrigin], ...] = ()
    drops_invalid: bool = False


def _expand(lo: int, hi: int | None) -> range:
    hi = lo if hi is None else hi
    if not (0 < lo <= hi <= 65535) or hi - lo >= MAX_RANGE:
        return range(0)
    return range(lo, hi + 1)


def _port_range(text: str) -> range:
    m = _PORT_RANGE.match(text)
    if not m:
        return range(0)
    return _expand(int(m.group(1)), int(m.group(2)) if m.group(2) else None)


def _reachable(
    roots: Iterable[str], edges: Mapping[str, list[tuple[bool, str]]], *, only_unconditional: bool
) -> set[str]:
    """Chains reached from ``roots`` by jump/goto (edges: chain -> [(conditional, target)])."""
    seen = set(roots)
    todo = list(seen)
    while todo:
        for conditional, target in edges.get(todo.pop(), ()):
            if (conditional and only_unconditional) or target in seen:
                continue
            seen.add(target)
            todo.append(target)
    return seen


# --- iptables-save ---------------------------------------------------------

_TCP_NAMES = frozenset({"tcp", "6"})
_ANY_PROTO = frozenset({"all", "0"})
# Matches that do not narrow which TCP packets a rule sees (beyond -p and the
# conntrack state it tests): anything else makes a rule conditional.
_NEUTRAL_MODULES = frozenset({"tcp", "conntrack", "state", "comment"})


@dataclass(frozen=True, slots=True)
class _IptRule:
    chain: str
    admits_tcp: bool  # the -p match lets TCP through (no -p: every protocol)
    conditional: bool  # some other match narrows which TCP packets hit it
    invalid: bool  # matches ct state INVALID (-m conntrack --ctstate / -m state --state)
    jump: str  # -j/-g target ("" for none)
    goto: bool
    target_args: tuple[str, ...]


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:  # an unbalanced quote in a comment: the words still parse
        return line.split()


def _parse_ipt_rule(words: list[str]) -> _IptRule:
    chain = words[1]
    proto: tuple[bool, str] | None = None
    conditional = False
    invalid = False
    jump, goto = "", False
    target_args: tuple[str, ...] = ()
    negate = False
    i = 2
    while i < len(words):
        word = words[i]
        arg = words[i + 1] if i + 1 < len(words) else ""
        step = 2
        if word == "!":
            negate, i = True, i + 1
            continue
        if word in ("-j", "--jump", "-g", "--goto"):
            jump, goto, target_args = arg, word in ("-g", "--goto"), tuple(words[i + 2 :])
            break
        if word in ("-p", "--protocol"):
            proto = (negate, arg.lower())
        elif word in ("-m", "--match"):
            conditional |= arg not in _NEUTRAL_MODULES
        elif word in ("--ctstate", "--state"):
            if negate or "INVALID" not in {s.upper() for s in arg.split(",")}:
                conditional = True
            else:
                invalid = True
        elif word != "--comment":
            # -s, -d, -i, -o, --dport, --syn, --uid-owner, --mark, ...: the rule
            # sees only some packets.  Step one word: an option's argument is
            # then one more unknown word, and a flag without one (--syn) does
            # not swallow the -j after it.
            conditional, step = True, 1
        negate = False
        i += step
    if proto is None:
        admits_tcp = True
    else:
        negated, name = proto
        if name in _ANY_PROTO:
            admits_tcp = not negated
        else:
            # "! -p udp" lets TCP through; "! -p tcp" does not.
            admits_tcp = (name not in _TCP_NAMES) if negated else (name in _TCP_NAMES)
    return _IptRule(chain, admits_tcp, conditional, invalid, jump, goto, target_args)


def _opt(args: tuple[str, ...], *names: str) -> str:
    for i, word in enumerate(args[:-1]):
        if word in names:
            return args[i + 1]
    return ""


def _is_local(addr: str) -> bool:
    """A DNAT address (or range ``a-b``) that only ever means this host's loopback."""
    try:
        return all(ipaddress.ip_address(a).is_loopback for a in addr.split("-"))
    except ValueError:
        return False


def _dnat_ports(dest: str, prerouting_only: bool) -> range:
    """Ports of a DNAT ``--to-destination`` that points at this host."""
    if dest.startswith("["):  # [::1]:15001
        addr, _, rest = dest[1:].partition("]")
        ports = rest[1:] if rest.startswith(":") else ""
    elif dest.count(":") > 1:  # a bare IPv6 address: no port
        return range(0)
    else:
        addr, _, ports = dest.partition(":")
    if not ports:
        return range(0)  # the original port is kept: no fixed capture port
    # ":15006" keeps the destination address: local only for packets that were
    # addressed to this host, i.e. inbound (PREROUTING), not the app's outbound.
    if (addr and _is_local(addr)) or (not addr and prerouting_only):
        return _port_range(ports)
    return range(0)


def _ipt_captures(
    rule: _IptRule, table: str, hooks: set[str], source: str
) -> Iterator[tuple[int, PortOrigin]]:
    if not rule.admits_tcp:
        return
    target = rule.jump
    if table == "nat" and target == "REDIRECT":
        ports = _port_range(_opt(rule.target_args, "--to-ports", "--to-port"))
        # REDIRECT without --to-ports keeps the port: nothing is captured.
    elif table == "nat" and target == "DNAT":
        dest = _opt(rule.target_args, "--to-destination", "--to")
        ports = _dnat_ports(dest, prerouting_only=hooks == {"PREROUTING"})
    elif table == "mangle" and target == "TPROXY":
        ports = _port_range(_opt(rule.target_args, "--on-port"))
    else:
        return
    origin = PortOrigin(source, table, rule.chain, target)
    for port in ports:
        yield port, origin


def parse_iptables_save(text: str, source: str) -> RuleScan:
    """TCP REDIRECT/DNAT-to-local/TPROXY captures and INVALID drops in ``iptables-save`` text."""
    tables: dict[str, list[_IptRule]] = {}
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:].strip()
            tables.setdefault(table, [])
            continue
        if not line.startswith("-A "):
            continue
        words = _split(line)
        if len(words) >= 2 and table:
            tables[table].append(_parse_ipt_rule(words))
    captures: list[tuple[int, PortOrigin]] = []
    drops_invalid = False
    for name, rules in tables.items():
        edges: dict[str, list[tuple[bool, str]]] = {}
        for rule in rules:
            # Targets (ACCEPT, REDIRECT, ...) become edges too; harmless, as no
            # rule has them for a chain.
            edges.setdefault(rule.chain, []).append(
                (rule.conditional or not rule.admits_tcp, rule.jump)
            )
        hooks_of: dict[str, set[str]] = {}
        for builtin in BUILTIN_CHAINS:
            for chain in _reachable([builtin], edges, only_unconditional=False):
                hooks_of.setdefault(chain, set()).add(builtin)
        if name in TABLES:
            for rule in rules:
                captures.extend(_ipt_captures(rule, name, hooks_of.get(rule.chain, set()), source))
        if name in DROP_TABLES and not drops_invalid:
            drops_invalid = _ipt_drops_invalid(rules, edges)
    return RuleScan(tuple(captures), drops_invalid)


def _ipt_drops_invalid(rules: list[_IptRule], edges: Mapping[str, list[tuple[bool, str]]]) -> bool:
    """An unconditional rule on the inbound path drops ct-INVALID TCP packets.

    Istio: ``-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP`` and
    ``-A ISTIO_DROP -j DROP``.  Only rules nothing else narrows count: this is
    part of a proof that licenses a kill, so a doubt means "no".
    """
    inbound = _reachable(["PREROUTING", "INPUT"], edges, only_unconditional=True)
    first: dict[str, _IptRule] = {}
    for rule in rules:
        first.setdefault(rule.chain, rule)

    def drops(rule: _IptRule) -> bool:
        if rule.jump == "DROP":
            return True
        head = first.get(rule.jump)
        return head is not None and head.jump == "DROP" and not head.conditional and head.admits_tcp

    return any(
        r.chain in inbound and r.invalid and r.admits_tcp and not r.conditional and drops(r)
        for r in rules
    )


# --- nft -j list ruleset ---------------------------------------------------

_L4_FIELDS = {("ip", "protocol"), ("ip6", "nexthdr")}
_NON_TCP = frozenset({"udp", "udplite", "sctp", "dccp", "icmp", "icmpv6", "esp", "ah"})
_NEUTRAL_STMTS = frozenset({"counter", "log", "limit", "notrack", "meta"})


def _values(right: Any) -> list[Any]:
    if isinstance(right, dict) and isinstance(right.get("set"), list):
        return list(right["set"])
    return [right]


def _nft_proto_admits_tcp(match: dict[str, Any]) -> bool | None:
    """None if the match does not constrain the L4 protocol, else whether TCP passes."""
    left = match.get("left")
    if not isinstance(left, dict):
        return None
    meta, payload = left.get("meta"), left.get("payload")
    proto_field = isinstance(meta, dict) and meta.get("key") == "l4proto"
    if isinstance(payload, dict):
        header = payload.get("protocol")
        if (header, payload.get("field")) in _L4_FIELDS:
            proto_field = True
        elif header == "tcp":
            return True  # "tcp dport 80" implies TCP
        elif header in _NON_TCP:
            return False  # "udp dport 53" implies UDP ("th dport" does not constrain)
    if not proto_field:
        return None
    has_tcp = any(v in ("tcp", 6) for v in _values(match.get("right")))
    return not has_tcp if match.get("op") == "!=" else has_tcp


def _is_ct_invalid(match: dict[str, Any]) -> bool:
    left = match.get("left")
    ct = left.get("ct") if isinstance(left, dict) else None
    if not (isinstance(ct, dict) and ct.get("key") == "state"):
        return False
    return match.get("op", "==") in ("==", "in") and "invalid" in _values(match.get("right"))


@dataclass(frozen=True, slots=True)
class _NftRule:
    chain: tuple[str, str, str]  # family, table, chain
    exprs: tuple[dict[str, Any], ...]

    @property
    def admits_tcp(self) -> bool:
        verdicts = [_nft_proto_admits_tcp(e["match"]) for e in self.exprs if "match" in e]
        return all(v is not False for v in verdicts)

    @property
    def invalid_only(self) -> bool:
        """Matches ct state INVALID and nothing else narrows it (the protocol aside)."""
        invalid = False
        for e in self.exprs:
            if "match" in e:
                if _is_ct_invalid(e["match"]):
                    invalid = True
                elif _nft_proto_admits_tcp(e["match"]) is None:
                    return False
            elif not (set(e) <= _NEUTRAL_STMTS | {"drop", "jump", "goto"}):
                return False
        return invalid

    @property
    def unconditional(self) -> bool:
        return all("match" not in e for e in self.exprs)

    def verdict(self, key: str) -> str | None:
        for e in self.exprs:
            if key in e:
                body = e[key]
                return str(body.get("target")) if isinstance(body, dict) else ""
        return None


def parse_nft_json(text: str, source: str = "nft") -> RuleScan:
    """TCP redirect/dnat/tproxy captures and INVALID drops in ``nft -j list ruleset``."""
    doc = json.loads(text) if text.strip() else {}
    hooks: dict[tuple[str, str, str], str] = {}  # base chain -> hook
    rules: list[_NftRule] = []
    for item in doc.get("nftables", []):
        if not isinstance(item, dict):
            continue
        chain = item.get("chain")
        if isinstance(chain, dict) and chain.get("hook"):
            key = (str(chain.get("family")), str(chain.get("table")), str(chain.get("name")))
            # A base chain of type nat/route cannot drop for us; filter can.
            hooks[key] = f"{chain.get('type', 'filter')}:{chain['hook']}"
        rule = item.get("rule")
        if isinstance(rule, dict) and isinstance(rule.get("expr"), list):
            key = (str(rule.get("family")), str(rule.get("table")), str(rule.get("chain")))
            exprs = tuple(e for e in rule["expr"] if isinstance(e, dict))
            rules.append(_NftRule(key, exprs))
    edges: dict[str, list[tuple[bool, str]]] = {}
    names = {r.chain: "/".join(r.chain) for r in rules} | {c: "/".join(c) for c in hooks}
    for r in rules:
        for kind in ("jump", "goto"):
            target = r.verdict(kind)
            if target:
                dest = "/".join((*r.chain[:2], target))
                edges.setdefault(names[r.chain], []).append((not r.unconditional, dest))
    hooks_of: dict[str, set[str]] = {}
    for base, hook in hooks.items():
        for chain in _reachable([names[base]], edges, only_unconditional=False):
            hooks_of.setdefault(chain, set()).add(hook.split(":")[1])
    captures: list[tuple[int, PortOrigin]] = []
    for r in rules:
        if not r.admits_tcp:
            continue
        origin_table = f"{r.chain[0]} {r.chain[1]}"
        for e in r.exprs:
            for stmt in ("redirect", "dnat", "tproxy"):
                body = e.get(stmt)
                if not isinstance(body, dict) or "port" not in body:
                    continue
                if stmt == "dnat" and not _nft_dnat_local(
                    body, hooks_of.get(names[r.chain], set())
                ):
                    continue
                origin = PortOrigin(source, origin_table, r.chain[2], stmt)
                captures.extend((port, origin) for port in _nft_ports(body["port"]))
    return RuleScan(tuple(captures), _nft_drops_invalid(rules, hooks, edges, names))


def _nft_dnat_local(body: dict[str, Any], hooks: set[str]) -> bool:
    addr = body.get("addr")
    if addr is None:  # "dnat to :15006": the address is kept (see _dnat_ports)
        return hooks == {"prerouting"}
    return isinstance(addr, str) and _is_local(addr)


def _nft_drops_invalid(
    rules: list[_NftRule],
    hooks: Mapping[tuple[str, str, str], str],
    edges: Mapping[str, list[tuple[bool, str]]],
    names: Mapping[tuple[str, str, str], str],
) -> bool:
    """``ct state invalid drop`` (or a jump to a chain that drops) on the inbound path."""
    roots = [
        names[c]
        for c, h in hooks.items()
        if h.split(":")[1] in INBOUND_HOOKS and h[:7] == "filter:"
    ]
    inbound = _reachable(roots, edges, only_unconditional=True)
    first: dict[str, _NftRule] = {}
    for r in rules:
        first.setdefault(names[r.chain], r)

    def drops(r: _NftRule) -> bool:
        if r.verdict("drop") is not None:
            return True
        target = r.verdict("jump") or r.verdict("goto")
        head = first.get("/".join((*r.chain[:2], target))) if target else None
        return head is not None and head.unconditional and head.verdict("drop") is not None

    return any(
        names[r.chain] in inbound and r.invalid_only and r.admits_tcp and drops(r) for r in rules
    )


def _nft_ports(value: Any) -> range:
    if isinstance(value, int):
        return _expand(value, None)
    if isinstance(value, dict) and isinstance(value.get("range"), list):
        lo, hi = value["range"]
        if isinstance(lo, int) and isinstance(hi, int):
            return _expand(lo, hi)
    return range(0)  # maps/expressions: not a fixed port


def merge(found: Iterable[tuple[int, PortOrigin]]) -> dict[int, tuple[PortOrigin, ...]]:
    origins: dict[int, list[PortOrigin]] = {}
    for port, origin in found:
        seen = origins.setdefault(port, [])
        if origin not in seen:
            seen.append(origin)
    return {p: tuple(o) for p, o in sorted(origins.items())}


def combine(
    scans: Iterable[RuleScan],
    sources_read: tuple[str, ...] = (),
    sources_failed: Mapping[str, str] | None = None,
    sources_missing: tuple[str, ...] = (),
) -> CapturePorts:
    """One netns's view over all its rule sources: NAT ports apart from TPROXY ports."""
    scans = list(scans)
    origins = merge(c for s in scans for c in s.captures)
    nat = frozenset(p for p, o in origins.items() if any(not x.is_tproxy for x in o))
    tproxy = frozenset(p for p, o in origins.items() if any(x.is_tproxy for x in o))
    return CapturePorts(
        ports=nat,
        origins=origins,
        sources_read=sources_read,
        sources_failed=dict(sources_failed or {}),
        sources_missing=sources_missing,
        tproxy_ports=tproxy,
        drops_invalid=any(s.drops_invalid for s in scans),
    )


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
    scans: list[RuleScan] = []
    read: list[str] = []
    failed: dict[str, str] = {}
    for (name, _argv), (ok, out) in zip(sources, results, strict=True):
        if not ok:
            failed[name] = out
            continue
        try:
            scans.append(
                parse_nft_json(out, name) if name == "nft" else parse_iptables_save(out, name)
            )
        except (ValueError, KeyError, TypeError) as exc:
            failed[name] = f"unparsable output: {exc}"
            continue
        read.append(name)
    if not read:
        why = "; ".join(f"{k}: {v}" for k, v in failed.items())
        raise RulesUnreadable(
            f"cannot read NAT rules in {handle.label} ({why}); pass --capture-ports"
        )
    missing = tuple(k for k, why in failed.items() if _tool_missing(why))
    return combine(scans, tuple(read), failed, missing)
