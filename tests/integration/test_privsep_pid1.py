"""The kernel worker starts when the agent is PID 1 of its PID namespace.

Without ``hostPID`` (the chart's default) the agent is its container's entry
point: PID 1 of the pod's PID namespace, so the forked worker's ``getppid()`` is
1 from the start. Taking that for "the parent died before PDEATHSIG was armed"
made the worker exit at once, silently, and every scan failed with "the kernel
worker is gone" (found by `make e2e-node` on a real containerd + runc node).
Here the program runs as PID 1 of a new PID namespace (``unshare --pid``), as
in a container, forks the worker and calls it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel

PROGRAM = """
import os
from halfclose.agent.kernel.privsep import start_worker
assert os.getpid() == 1, os.getpid()
client = start_worker(lambda: {"ping": lambda params, fds: (["pong", os.getppid()], ())})
result, _ = client.call("ping")
print(result[0], result[1])
client.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing")
def test_worker_serves_when_the_agent_is_pid_1_of_its_namespace() -> None:
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", PROGRAM],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["pong", "1"], proc.stdout + proc.stderr[-2000:]
