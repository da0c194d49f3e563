"""``nft -j list ruleset`` JSON -> TCP captures and drops of conntrack-INVALID packets.

Captures: ``redirect``, ``dnat`` to a local port, ``tproxy``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from halfclose.agent.kernel.natrules.capture import (
    PortOrigin,
    RuleScan,
    expand,
    is_local,
    reachable,
)

# A late FIN from the peer enters through these hooks.
INBOUND_HOOKS = frozenset({"prerouting", "input"})

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
        for chain in reachable([names[base]], edges, only_unconditional=False):
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
    return isinstance(addr, str) and is_local(addr)


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
    inbound = reachable(roots, edges, only_unconditional=True)
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
        return expand(value, None)
    if isinstance(value, dict) and isinstance(value.get("range"), list):
        lo, hi = value["range"]
        if isinstance(lo, int) and isinstance(hi, int):
            return expand(lo, hi)
    return range(0)  # maps/expressions: not a fixed port
