"""Part 2 without rule-reading privilege: DST_NAT conntrack entries show the capture.

Where no rule source can be read (no tool, or iptables-legacy without
CAP_NET_RAW), the netns's destination-NATed TCP entries still say which local
endpoint a REDIRECT feeds: any live connection through the sidecar leaves one.
The scan then judges that port and proves the leak by conntrack (design.md §2
part 2).  Before (commit 33bbaae) such a scan was an error ("cannot read NAT
rules").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from halfclose.agent.core.model import Capture, Kind
from halfclose.agent.engine.scan import ScanSettings, scan
from halfclose.agent.kernel.netns import NetnsHandle

pytestmark = pytest.mark.kernel


def _path_with_only_nsenter(tmp_path: Path) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if (Path(d) / "nsenter").exists():
            (bindir / "nsenter").symlink_to(Path(d) / "nsenter")
            break
    return str(bindir)


def test_leak_proven_by_dst_nat_entries_when_no_rule_is_readable(
    make_lab: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = make_lab()
    leaks = lab.leak(count=2)
    lab.idle(count=1)  # a live connection through the sidecar: its entry is the evidence
    with NetnsHandle.from_name(lab.pod_netns(0)) as handle, monkeypatch.context() as m:
        m.setenv("PATH", _path_with_only_nsenter(tmp_path))
        result = scan(handle, ScanSettings())
    outbound, _inbound = lab.capture_ports
    assert outbound in result.capture_ports
    assert any("could not be read" in w for w in result.warnings)
    leaked = {
        (str(f.socket.local), str(f.socket.peer))
        for f in result.findings
        if f.kind is Kind.LEAKED and f.capture is Capture.CONNTRACK
    }
    assert leaked == {(str(p.proxy_downstream), str(p.app)) for p in leaks}
