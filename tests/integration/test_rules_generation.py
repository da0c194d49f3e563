"""The agent's rules cache (issue 11): re-read when the rule set changed, not by the clock.

``ScanSettings.rules_unchanged_max_age_seconds`` keeps a netns's rules while
its nftables generation id has not moved and no iptables-legacy table exists
(``natrules.generation``).  Part 2 rests on those rules, so a change must be
seen by the very next scan, and where no generation exists (legacy tables)
the age-based re-read stays.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from halfclose.agent.engine import scan as scan_mod
from halfclose.agent.engine.scan import Scanner, ScanSettings
from halfclose.agent.kernel.netns import NetnsHandle
from support.scratchnet import run, scratch_netns, skip_unless_root

pytestmark = pytest.mark.kernel

# As the agent runs it: an hour either way, so only the change check can re-read.
CACHED = ScanSettings(rules_max_age_seconds=3600.0, rules_unchanged_max_age_seconds=3600.0)


def redirect(ns: str, port: int, tool: str = "iptables", op: str = "-A") -> None:
    argv = [tool, "-w", "-t", "nat", op, "OUTPUT", "-p", "tcp"]
    if op == "-A":
        argv += ["-j", "REDIRECT", "--to-ports", str(port)]
    run(*argv, netns=ns)


@pytest.fixture
def detects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts ``detect`` runs (the five rule tools) made by scans."""
    calls: list[int] = []
    real = scan_mod.detect

    def counting(handle: NetnsHandle, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(handle)

    monkeypatch.setattr(scan_mod, "detect", counting)
    yield calls


def test_nft_rule_change_is_seen_by_the_next_scan(detects: list[int]) -> None:
    skip_unless_root("iptables", "nft", "conntrack")
    with scratch_netns("rg") as ns:
        redirect(ns, 15001)
        with NetnsHandle.from_name(ns) as handle, Scanner(handle) as scanner:
            assert scanner.scan(CACHED).capture_ports == (15001,)
            assert scanner.scan(CACHED).capture_ports == (15001,)
            assert len(detects) == 1, "unchanged rules were read again"
            # The capture moves to another port: the proof's part 2 must follow at once.
            run("iptables", "-w", "-t", "nat", "-F", "OUTPUT", netns=ns)
            redirect(ns, 15006)
            assert scanner.scan(CACHED).capture_ports == (15006,)
            # And removed: no port is judged (the scan refuses rather than keep 15006).
            run("nft", "flush", "ruleset", netns=ns)
            assert scanner.scan(CACHED).capture_ports == ()
            assert len(detects) == 3


def test_legacy_tables_fall_back_to_the_age(detects: list[int]) -> None:
    """iptables-legacy has no generation: its rules are re-read by age, here every scan."""
    skip_unless_root("iptables", "iptables-legacy", "conntrack")
    every_scan = ScanSettings(rules_max_age_seconds=0.0, rules_unchanged_max_age_seconds=3600.0)
    with scratch_netns("rl") as ns:
        redirect(ns, 15001, tool="iptables-legacy")
        with NetnsHandle.from_name(ns) as handle, Scanner(handle) as scanner:
            assert scanner.scan(every_scan).capture_ports == (15001,)
            run("iptables-legacy", "-w", "-t", "nat", "-F", "OUTPUT", netns=ns)
            redirect(ns, 15006, tool="iptables-legacy")
            assert scanner.scan(every_scan).capture_ports == (15006,)
            assert len(detects) == 2


def test_a_legacy_table_appearing_is_a_change(detects: list[int]) -> None:
    skip_unless_root("iptables", "iptables-legacy", "conntrack")
    with scratch_netns("ra") as ns:
        redirect(ns, 15001)
        with NetnsHandle.from_name(ns) as handle, Scanner(handle) as scanner:
            assert scanner.scan(CACHED).capture_ports == (15001,)
            redirect(ns, 15006, tool="iptables-legacy")
            assert scanner.scan(CACHED).capture_ports == (15001, 15006)
            assert len(detects) == 2
