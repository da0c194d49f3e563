"""A private NETNS_DIR, as the default chart's agent finds pods (issue 13).

containerd bind-mounts each pod's netns at ``/var/run/netns/cni-<id>``; the
agent without host PID or host /proc finds pods there.  Tests point
``NETNS_DIR`` at a private directory holding one such bind mount.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def netns_bind_dir(netns_path: str, tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/netns`` holding a bind mount of ``netns_path``; unmounted on exit."""
    if shutil.which("setpriv") is None or shutil.which("mount") is None:
        pytest.skip("setpriv and mount (util-linux) are needed")
    directory = tmp_path / "netns"
    directory.mkdir()
    entry = directory / f"cni-hsc-{secrets.token_hex(4)}"
    entry.touch()
    subprocess.run(["mount", "--bind", netns_path, str(entry)], check=True, timeout=10)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(entry)], check=False, timeout=10)
