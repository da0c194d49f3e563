"""The product under test, driven through its CLI contract (design.md §4).

Kernel regression tests that must be shown to fail on the pre-session code
call ``halfclose scan`` as a subprocess, so the same test can judge another
build: ``HALFCLOSE_BIN=/work/base/.venv/bin/halfclose pytest tests/integration/
test_dualstack.py`` runs this tree's lab (the stage) against that build's
scanner (the product).  By default it is this tree's console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

SCAN_TIMEOUT = 60.0


def halfclose_argv() -> list[str]:
    override = os.environ.get("HALFCLOSE_BIN")
    if override:
        return [override]
    script = Path(sys.executable).with_name("halfclose")
    if script.exists():
        return [str(script)]
    found = shutil.which("halfclose")
    return [found] if found else [sys.executable, "-m", "halfclose"]


def scan(netns: str, *args: str) -> dict[str, Any]:
    """``halfclose scan --netns NETNS ARGS --output json``: the parsed report."""
    done = subprocess.run(
        [*halfclose_argv(), "scan", "--netns", netns, *args, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=SCAN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"halfclose scan exited {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def by_peer(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Findings keyed by their ``peer`` (ss spelling)."""
    return {f["peer"]: f for f in report["findings"]}


def kinds(report: dict[str, Any], peers: list[str]) -> list[str | None]:
    """The kind reported for each peer, None where there is no finding."""
    found = by_peer(report)
    return [found[p]["kind"] if p in found else None for p in peers]
