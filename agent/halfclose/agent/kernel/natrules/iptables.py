"""``iptables-save`` text -> TCP captures and drops of conntrack-INVALID packets.

Captures: nat REDIRECT, nat DNAT to a local port, mangle TPROXY.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from halfclose.agent.kernel.natrules.capture import (
    PortOrigin,
    RuleScan,
    is_local,
    port_range,
    reachable,
)

# Tables whose rules can capture: nat (REDIRECT, DNAT) and mangle (TPROXY).
TABLES = frozenset({"nat", "mangle"})
# Tables where a drop of ct-state INVALID packets takes effect (raw runs before
# conntrack, nat never sees INVALID packets).
DROP_TABLES = frozenset({"mangle", "filter", "security"})
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

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
    if (addr and is_local(addr)) or (not addr and prerouting_only):
        return port_range(ports)
    return range(0)


def _ipt_captures(
    rule: _IptRule, table: str, hooks: set[str], source: str
) -> Iterator[tuple[int, PortOrigin]]:
    if not rule.admits_tcp:
        return
    target = rule.jump
    if table == "nat" and target == "REDIRECT":
        ports = port_range(_opt(rule.target_args, "--to-ports", "--to-port"))
        # REDIRECT without --to-ports keeps the port: nothing is captured.
    elif table == "nat" and target == "DNAT":
        dest = _opt(rule.target_args, "--to-destination", "--to")
        ports = _dnat_ports(dest, prerouting_only=hooks == {"PREROUTING"})
    elif table == "mangle" and target == "TPROXY":
        ports = port_range(_opt(rule.target_args, "--on-port"))
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
            for chain in reachable([builtin], edges, only_unconditional=False):
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
    inbound = reachable(["PREROUTING", "INPUT"], edges, only_unconditional=True)
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
