"""The ``main`` of every capture script: rerun the script inside a scratch netns.

Each capture script calls ``run(__file__, inside, suffix)``: as root it creates a
netns with a unique ``hct-`` name, reruns itself there with ``--inside`` (which
calls ``inside``), and deletes the netns whatever happens.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def run(script: str, inside: Callable[[], None], suffix: str) -> int:
    prog = Path(script).name
    if os.geteuid() != 0:
        print(f"{prog}: must run as root", file=sys.stderr)
        return 2
    if sys.argv[1:] == ["--inside"]:
        inside()
        return 0
    name = f"hct-{secrets.token_hex(2)}-{suffix}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, script, "--inside"],
            check=True,
            timeout=60,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    print(f"{prog}: wrote dumps to {Path(script).resolve().parent}")
    return 0
