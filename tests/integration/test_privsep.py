"""Capability-free network code (issue 13 §3): the kernel worker keeps the chart's
capabilities, the process that talks to the network keeps none.

A small program runs as root under exactly the default chart's capabilities
(``setpriv``): it forks the privileged kernel worker (``start_kernel_worker`` over
the real ``LocalKernel``, finding the lab pod through a private netns bind-mount
directory), drops its own capabilities, and then does the agent's kernel work
only through the worker: resolve the pod by IP, open its netns (the conntrack
event socket comes back as a passed fd), scan it.  /proc/<pid>/status shows the
two processes' capability sets; the worker's own guards refuse a netns it did
not resolve for a pod, the parent can no longer enter any netns itself, and the
service-account token mount (a tmpfs stand-in) is gone from the worker's mount
namespace only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.netnsdir import netns_bind_dir

pytestmark = pytest.mark.kernel

CHART_CAPS = "-all,+net_admin,+sys_admin"
CHART_MASK = (1 << 12) | (1 << 21)  # CAP_NET_ADMIN, CAP_SYS_ADMIN

PROGRAM = """
import json, os, sys
from halfclose.agent.daemon.kernel import LocalKernel
from halfclose.agent.daemon.remediate import EngineRemediator
from halfclose.agent.daemon import worker as worker_module
from halfclose.agent.daemon.worker import start_kernel_worker
from halfclose.agent.engine.scan import ScanSettings
from halfclose.agent.kernel.mountns import MountedNetnsResolver
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.agent.kernel.privsep import capabilities_of, drop_capabilities
from halfclose.errors import PermissionDenied, UserError

netns_dir, pod_ip, state, token_dir = sys.argv[1:5]
worker_module.SERVICE_ACCOUNT_DIR = token_dir  # a stand-in for the pod's token mount
os.environ["KUBECONFIG"] = "/nonexistent/kubeconfig"
kernel = start_kernel_worker(
    lambda: LocalKernel(EngineRemediator(state, "/proc"), MountedNetnsResolver(netns_dir))
)
drop_capabilities()
out = {"parent": capabilities_of(), "worker": capabilities_of(kernel.client.pid),
       "worker_pid": kernel.client.pid}
def mounted(pid):
    with open(f"/proc/{pid}/mountinfo") as f:
        return any(line.split()[4] == token_dir for line in f)
where = kernel.resolve(frozenset(), [pod_ip])  # a first round trip: the worker is set up
out["token_mount"] = {"parent": mounted("self"), "worker": mounted(kernel.client.pid)}
where = kernel.resolve(frozenset(), [pod_ip])
opened = kernel.open_netns(where.inode, where.path)
out["events_fd_is_netlink"] = opened.events_fd is not None and os.readlink(
    f"/proc/self/fd/{opened.events_fd}").startswith("socket:")
result = kernel.scan(where.inode, ScanSettings(min_idle_seconds=0.0))
out["kinds"] = sorted(str(f.kind) for f in result.findings)
refused = {}
for label, path in (("own", "/proc/self/ns/net"), ("unresolved", where.path + ".x")):
    try:
        kernel.open_netns(os.stat(path).st_ino if os.path.exists(path) else 1, path)
        refused[label] = "opened"
    except PermissionDenied as exc:
        refused[label] = "PermissionDenied"
    except Exception as exc:
        refused[label] = type(exc).__name__
out["refused"] = refused
try:
    NetnsHandle.from_path(where.path)
    out["parent_setns"] = "entered"
except UserError as exc:
    out["parent_setns"] = str(exc)
kernel.close_netns(where.inode)
kernel.close()
print(json.dumps(out))
"""


@pytest.fixture
def netns_dir(lab: Any, tmp_path: Path) -> Iterator[Path]:
    with netns_bind_dir(lab.pod_netns_path(0), tmp_path) as directory:
        yield directory


@pytest.fixture
def token_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs standing in for the pod's service-account token mount."""
    path = tmp_path / "serviceaccount"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "none", str(path)],
                   check=True, timeout=10)  # fmt: skip
    (path / "token").write_text("not-a-real-token")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, timeout=10)


def test_network_side_holds_no_capability_and_the_worker_exactly_the_charts(
    lab: Any, netns_dir: Path, tmp_path: Path, token_dir: Path
) -> None:
    lab.leak(count=2)
    proc = subprocess.run(
        ["setpriv", "--bounding-set", CHART_CAPS, "--inh-caps", "-all",
         sys.executable, "-c", PROGRAM, str(netns_dir), lab.pod_ip(0), str(tmp_path / "state"),
         str(token_dir)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    parent, worker = out["parent"], out["worker"]
    # The network-facing process: nothing effective, permitted, inheritable or ambient.
    assert parent["CapEff"] == parent["CapPrm"] == parent["CapInh"] == parent["CapAmb"] == 0
    # The worker: exactly the chart's two.
    assert worker["CapEff"] == worker["CapPrm"] == CHART_MASK
    assert out["kinds"].count("leaked") == 2, out["kinds"]
    assert out["events_fd_is_netlink"] is True
    assert out["refused"] == {"own": "PermissionDenied", "unresolved": "PermissionDenied"}
    assert "cannot enter" in out["parent_setns"]
    # The worker has no API credentials: the token mount is gone from its mount
    # namespace (and only from its own: the network side still reads it).
    assert out["token_mount"] == {"parent": True, "worker": False}
