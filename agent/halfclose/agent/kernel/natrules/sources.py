"""Run every rule tool inside a netns (in parallel) and combine what they say.

A tool that is missing or fails is recorded, not fatal; only when *no* source
could be read is that the user's problem (they can pass ``--capture-ports``).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

from halfclose.agent.kernel.natrules.capture import CapturePorts, RuleScan, combine
from halfclose.agent.kernel.natrules.iptables import parse_iptables_save
from halfclose.agent.kernel.natrules.nft import parse_nft_json
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.errors import RulesUnreadable

IPTABLES_SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("iptables-nft", ("iptables-save",)),
    ("ip6tables-nft", ("ip6tables-save",)),
    ("iptables-legacy", ("iptables-legacy-save",)),
    ("ip6tables-legacy", ("ip6tables-legacy-save",)),
)
NFT_SOURCE = ("nft", ("nft", "-j", "list", "ruleset"))


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
