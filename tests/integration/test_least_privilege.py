"""The scan and kill under exactly the agent's capabilities in the Helm chart.

The default chart gives the agent NET_ADMIN and SYS_ADMIN and nothing else
(charts/halfclose/templates/agent/daemonset.yaml; SYS_PTRACE only comes with the
agent.hostPID opt-in).  These tests run the CLI as root with its bounding set
cut to those two (`setpriv`), so they check the
chart's claims on the real kernel: what works, and what is reported rather
than silently missed when a capability is absent (NET_RAW for iptables-legacy,
DAC_READ_SEARCH for another user's /proc/<pid>/fd).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest

from support.scratchnet import skip_unless_root

pytestmark = pytest.mark.kernel

CHART_CAPS = "-all,+net_admin,+sys_admin"


def scan_as_agent(*args: str) -> dict[str, Any]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    as_agent = [setpriv, "--bounding-set", CHART_CAPS, "--inh-caps", "-all"]
    proc = subprocess.run(
        [*as_agent, sys.executable, "-m", "halfclose", "scan", *args, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def test_legacy_rules_unreadable_without_net_raw_is_reported(make_lab: Any) -> None:
    skip_unless_root("ip", "iptables-legacy")
    lab = make_lab(style="linkerd", backend="iptables-legacy")
    lab.leak(count=2)
    doc = scan_as_agent("--netns", lab.pod_netns(0))
    # Linkerd's rules are invisible without CAP_NET_RAW: no ports, no findings,
    # and the scan says why instead of looking clean.
    assert doc["capture_ports"] == [] and doc["findings"] == []
    assert any("iptables-legacy" in w and "could not be read" in w for w in doc["warnings"])


def test_given_ports_find_pair_and_kill_with_the_charts_capabilities(make_lab: Any) -> None:
    skip_unless_root("ip", "iptables-legacy")
    lab = make_lab(style="linkerd", backend="iptables-legacy")
    leaks = lab.leak(count=2)
    lab.idle(count=1)  # live traffic, as in any pod: conntrack is visibly tracking
    ports = ",".join(map(str, lab.capture_ports))
    doc = scan_as_agent("--netns", lab.pod_netns(0), "--capture-ports", ports, "--processes")
    found = {(f["local"], f["peer"]): f for f in doc["findings"] if f["kind"] == "leaked"}
    assert set(found) == {(str(p.proxy_downstream), str(p.app)) for p in leaks}
    for p in leaks:
        f = found[(str(p.proxy_downstream), str(p.app))]
        # No DAC_READ_SEARCH: the proxy's /proc/<pid>/fd (uid 2102) is unreadable,
        # so no pid; the upstream leg is still paired, by the socket's uid.
        assert f["pid"] is None
        assert f["upstream"] is not None and f["upstream"]["local"] == str(p.proxy_upstream)

    killed = scan_as_agent(
        "--netns", lab.pod_netns(0), "--capture-ports", ports, "--action", "kill", "--min-idle", "0"
    )
    assert sorted(f["action"] for f in killed["findings"] if f["kind"] == "leaked") == [
        "killed",
        "killed",
    ]
    after = scan_as_agent("--netns", lab.pod_netns(0), "--capture-ports", ports)
    assert [f for f in after["findings"] if f["kind"] == "leaked"] == []
