"""A netns the agent may not enter is a permission failure, not a pod that went away.

Real kernel: the agent runs in a child process without CAP_SYS_ADMIN (root uid,
the capability dropped from its bounding set, as a misconfigured DaemonSet
would run it), so ``setns`` into a real pod netns fails with EPERM.  The agent
must count ``halfclose_scan_errors_total{reason="permission"}`` — which the
scan-error alert sees — and never ``netns_gone``, which the alert ignores
(issue 12 §3: before, every such failure read as ``netns_gone``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from support.scratchnet import scratch_netns, skip_unless_root

# The child: the production Agent over the in-memory API and a resolver that
# answers the scratch netns for the pod; a few passes, then the error counts.
CHILD = r"""
import json, sys, time
from prometheus_client import CollectorRegistry
from halfclose.agent.daemon.loop import Agent
from halfclose.agent.daemon.metrics import AgentMetrics
from halfclose.agent.daemon.remediate import EngineRemediator
from halfclose.agent.daemon.settings import AgentSettings
from halfclose.agent.kernel.podnetns import PodNetns
from halfclose.agent.kube.fake import FakeReports, FakeWorld

path, state = sys.argv[1], sys.argv[2]
import os
inode = os.stat(path).st_ino

class Resolver:
    def resolve(self, *args, **kw):
        return PodNetns(inode, 0, path)
    def invalidate(self):
        pass

world = FakeWorld()
world.put_namespace("shop")
world.put_pod({
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"namespace": "shop", "name": "web", "uid": "u-1", "labels": {}},
    "spec": {"nodeName": "n", "containers": [{"name": "app"}]},
    "status": {"phase": "Running", "podIP": "192.0.2.7", "podIPs": [{"ip": "192.0.2.7"}],
               "containerStatuses": [{"name": "app", "containerID": "containerd://" + "b" * 64}]},
})
world.put_policy({
    "apiVersion": "halfclose.io/v1alpha1", "kind": "HalfClosePolicy",
    "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
    "spec": {"namespaces": ["shop"], "action": "Report", "scanIntervalSeconds": 30},
})
registry = CollectorRegistry()
agent = Agent(AgentSettings(node_name="n", state_dir=state), AgentMetrics(registry, "n"),
              world, FakeReports(), EngineRemediator(state), resolver=Resolver())
for _ in range(3):
    agent.run_once(max_wait=0.05)
agent.shutdown()
out = {}
for fam in registry.collect():
    if fam.name == "halfclose_scan_errors":
        for s in fam.samples:
            if s.name.endswith("_total"):
                out[s.labels["reason"]] = s.value
print(json.dumps(out))
"""


def test_setns_eperm_is_counted_as_permission_not_netns_gone(tmp_path: object) -> None:
    skip_unless_root("ip")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed")
    with scratch_netns("eperm") as name:
        proc = subprocess.run(
            [
                setpriv,
                "--bounding-set=-sys_admin",
                "--inh-caps=-sys_admin",
                sys.executable,
                "-c",
                CHILD,
                f"/run/netns/{name}",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors.get("permission", 0) >= 1, (errors, proc.stderr)
    assert errors.get("netns_gone", 0) == 0, (errors, proc.stderr)
