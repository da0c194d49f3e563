"""The capture rules of the scratch sidecar meshes (leakfarm, minimesh).

Connections to the service 203.0.113.10:7777 are redirected to the proxy on
:15001, except the proxy's own upstream dials, which carry ``MARK`` (Istio's
TPROXY mode exempts its proxy the same way).  No pytest here: bench uses it too.
"""

from __future__ import annotations

MARK = 0x539


def capture_rules(chain: str = "OUTPUT") -> list[list[str]]:
    """The iptables commands (nat table, appended to ``chain``), to run inside the netns."""
    nat = ["iptables", "-t", "nat", "-A", chain, "-p", "tcp"]
    return [
        [*nat, "-m", "mark", "--mark", hex(MARK), "-j", "RETURN"],
        [*nat, "-d", "203.0.113.10", "--dport", "7777", "-j", "REDIRECT", "--to-ports", "15001"],
    ]
