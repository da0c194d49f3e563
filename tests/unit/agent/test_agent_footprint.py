"""The agent's import footprint (issue 11: <= 64 MiB RSS on a node).

The ``kubernetes`` package cost 46 MiB of RSS to import, for a client the agent only
used as a transport; the agent has its own (``halfclose.agent.kube.client``).  These
keep it (and its urllib3/aiohttp/pydantic stack) out of the process and the image.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DROPPED = {"kubernetes", "urllib3", "aiohttp", "requests", "pydantic", "websocket"}

PROBE = """
import json, sys
import halfclose.agent.daemon.main
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
print(json.dumps({"modules": sorted({m.split(".")[0] for m in sys.modules}), "rss_kib": rss}))
"""


def test_the_daemon_imports_no_kubernetes_stack_and_stays_small() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    probe = json.loads(out.stdout)
    assert not DROPPED & set(probe["modules"])
    # In a pod the config is in-cluster: no kubeconfig, so no YAML parser either.
    assert "yaml" not in probe["modules"]
    # Measured 31 MiB (54 MiB with the kubernetes package); room for growth, not for it.
    assert probe["rss_kib"] < 45 * 1024, f"{probe['rss_kib'] / 1024:.1f} MiB after import"


def test_the_agent_distribution_and_image_pin_no_kubernetes_stack() -> None:
    project = tomllib.loads((REPO / "agent" / "pyproject.toml").read_text(encoding="utf-8"))
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in
             project["project"]["dependencies"]}  # fmt: skip
    assert not DROPPED & names
    pins = {
        line.split("==")[0].lower()
        for line in (REPO / "requirements" / "agent.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    }
    assert pins and not DROPPED & pins, pins
