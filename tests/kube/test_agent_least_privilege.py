"""The agent under exactly the default chart's privileges, end to end (issue 13).

The default chart gives the agent NET_ADMIN and SYS_ADMIN, no SYS_PTRACE, no host
PID namespace and no host /proc; it finds pods through the runtime's netns bind
mounts (``NETNS_DIR``).  Here the real ``halfclose-agent`` runs as root with its
bounding set cut to those two capabilities (``setpriv``, as
tests/integration/test_least_privilege.py does for the CLI), against the real
control plane as the chart's agent ServiceAccount, with ``NETNS_DIR`` a private
directory holding a bind mount of the lab pod's netns (what containerd makes) and
a Pod whose ``status.podIPs`` is the lab pod's address and whose container ID
resolves to nothing.  The leak lab's leaked sockets must be found and killed, and
the report written, under those privileges.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from halfclose.agent.kernel.privsep import capabilities_of
from support.controlplane import ControlPlane
from support.netnsdir import netns_bind_dir

pytestmark = [pytest.mark.kube, pytest.mark.kernel]

NODE = "node-a"
G, V = "halfclose.io", "v1alpha1"
# The default chart's capabilities (charts/halfclose/templates/agent/daemonset.yaml).
CHART_CAPS = "-all,+net_admin,+sys_admin"
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
CHART_MASK = (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def netns_dir(lab: Any, tmp_path: Path) -> Iterator[Path]:
    """A private NETNS_DIR with the lab pod's netns bind-mounted as containerd does."""
    with netns_bind_dir(lab.pod_netns_path(0), tmp_path) as directory:
        yield directory


def _seed(kube: ControlPlane, lab: Any) -> None:
    kube.put_object("", "v1", "namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": "shop"}})  # fmt: skip
    ip = lab.pod_ip(0)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": "shop", "name": "web", "labels": {"app": "web"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "203.0.113.254",
            "hostIPs": [{"ip": "203.0.113.254"}],
            # An ID no process carries: only the bind mount + IP can find this pod.
            "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0,
                                   "image": "app:1", "imageID": "",
                                   "containerID": f"containerd://{secrets.token_hex(32)}",
                                   "state": {"running": {}}}],
        },
    }  # fmt: skip
    kube.put_object("", "v1", "pods", pod)
    policy = {
        "apiVersion": f"{G}/{V}",
        "kind": "HalfClosePolicy",
        "metadata": {"name": "kill"},
        "spec": {"namespaces": ["shop"], "action": "KillSockets",
                 "thresholds": {"minIdleSeconds": 0}, "scanIntervalSeconds": 2},
    }  # fmt: skip
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(policy))


@contextlib.contextmanager
def agent_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    argv = ["setpriv", "--bounding-set", CHART_CAPS, "--inh-caps", "-all",
            sys.executable, "-m", "halfclose.agent.daemon.main"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _tcp_socket_inodes(pid: int) -> set[int]:
    """Inodes of the TCP sockets (v4 and v6) in pid's network namespace."""
    inodes: set[int] = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
                inodes.add(int(line.split()[9]))
    return inodes


def _held_sockets(pid: int) -> set[int]:
    held: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                held.add(int(target[8:-1]))
    return held


def test_leak_lab_end_to_end_under_the_default_chart_privileges(
    kube: ControlPlane, lab: Any, netns_dir: Path, tmp_path: Path
) -> None:
    _seed(kube, lab)
    leaks = lab.leak(count=2)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "NODE_NAME": NODE,
        "KUBECONFIG": kube.chart_kubeconfig("agent"),
        "NETNS_DIR": str(netns_dir),
        "METRICS_PORT": "0",
        "STATE_DIR": str(tmp_path / "state"),
        "LOG_LEVEL": "INFO",
    }
    if "PYTHONPATH" in os.environ:  # a run against another checkout of the sources
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    log = tmp_path / "agent.log"
    with agent_process(env, log) as proc:
        try:
            report = wait_for(
                "the report of 2 kills",
                lambda: (
                    proc.poll() is None
                    and (r := kube.get_object(G, V, "halfclosereports", "web", "shop"))
                    and (r.get("status") or {}).get("killedTotal") == 2
                    and r
                ),
                40,
            )
        except AssertionError:
            raise AssertionError(log.read_text()[-4000:]) from None
        assert proc.poll() is None, log.read_text()[-4000:]
        killed = [f for f in report["status"]["findings"] if f["action"] == "killed"]
        assert {(f["local"], f["peer"]) for f in killed} == {
            (str(p.proxy_downstream), str(p.app)) for p in leaks
        }
        # Owners by uid only: no host PIDs, no ptrace, so no pid or process name.
        assert all(f.get("pid") is None for f in killed)
        # Privilege separation: the process with the API client and the HTTP
        # server holds no capability; its one child, the kernel worker, exactly
        # the chart's, and no TCP socket at all (no listener, no API connection).
        main = capabilities_of(proc.pid)
        assert main["CapBnd"] == CHART_MASK
        assert main["CapEff"] == main["CapPrm"] == main["CapInh"] == main["CapAmb"] == 0
        (worker,) = _children(proc.pid)
        held = capabilities_of(worker)
        assert held["CapEff"] == held["CapPrm"] == CHART_MASK
        tcp = _tcp_socket_inodes(proc.pid)
        assert _held_sockets(proc.pid) & tcp, "the main process talks to the API and listens"
        assert not _held_sockets(worker) & tcp, "the worker holds a TCP socket"
    assert "Traceback" not in log.read_text()
