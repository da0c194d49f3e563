"""Capture-port detection from a netns's own rules, on the real kernel and real tools.

Lab pods cover the mesh styles and rule backends; scratch namespaces cover what
the lab does not build (TPROXY, mixed sources, nothing readable).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from halfclose.agent.kernel.natrules.sources import detect
from halfclose.agent.kernel.netns import NetnsHandle
from halfclose.errors import UserError
from support.scratchnet import lab_factory, run, scratch_netns, skip_unless_root

pytestmark = pytest.mark.kernel


@pytest.fixture
def make_pod_lab(request: pytest.FixtureRequest) -> Any:
    return lab_factory(request)


@pytest.mark.parametrize(
    ("style", "backend", "ports"),
    [
        ("istio", "iptables-nft", {15001, 15006}),
        ("istio", "iptables-legacy", {15001, 15006}),
        ("istio", "nft", {15001, 15006}),
        ("linkerd", "iptables-nft", {4140, 4143}),
    ],
)
def test_lab_styles_and_backends(
    make_pod_lab: Any, style: str, backend: str, ports: set[int]
) -> None:
    lab = make_pod_lab(style=style, backend=backend)
    with NetnsHandle.from_name(lab.pod_netns(0)) as handle:
        found = detect(handle)
    assert found.ports == frozenset(ports) == frozenset(lab.capture_ports)
    # The owner exemption (-j RETURN for the proxy uid) is not a capture.
    for port in ports:
        origins = found.origins[port]
        assert origins and all(o.target.lower() in ("redirect", "tproxy") for o in origins)
    expected_source = {
        "iptables-nft": "iptables-nft",
        "iptables-legacy": "iptables-legacy",
        "nft": "nft",
    }[backend]
    assert {o.source for p in ports for o in found.origins[p]} == {expected_source}


def test_tproxy_and_redirect_across_all_sources() -> None:
    skip_unless_root("iptables", "iptables-legacy", "ip6tables", "nft")
    with scratch_netns("cp") as ns:
        run("iptables", "-t", "mangle", "-N", "MESH_INBOUND", netns=ns)
        run(
            "iptables",
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-j",
            "MESH_INBOUND",
            netns=ns,
        )
        run(
            "iptables",
            "-t",
            "mangle",
            "-A",
            "MESH_INBOUND",
            "-p",
            "tcp",
            "-j",
            "TPROXY",
            "--on-port",
            "15006",
            "--on-ip",
            "127.0.0.1",
            "--tproxy-mark",
            "0x1/0x1",
            netns=ns,
        )
        run(
            "ip6tables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
            netns=ns,
        )
        run(
            "iptables-legacy",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "4140",
            netns=ns,
        )
        run("nft", "add table inet mesh", netns=ns)
        run(
            "nft",
            "add chain inet mesh pre { type filter hook prerouting priority -150; }",
            netns=ns,
        )
        run("nft", "add rule inet mesh pre meta l4proto tcp tproxy ip to 127.0.0.1:15008", netns=ns)
        # A filter-table REDIRECT is impossible; a DNAT elsewhere is not a capture.
        run(
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-j",
            "DNAT",
            "--to-destination",
            "192.0.2.1:53",
            netns=ns,
        )
        with NetnsHandle.from_name(ns) as handle:
            found = detect(handle)
    # TPROXY is not NAT: its ports are kept apart (design.md §2 part 2).
    assert found.ports == {15001, 4140}
    assert found.tproxy_ports == {15006, 15008}
    assert [str(o) for o in found.origins[15006]] == ["iptables-nft mangle/MESH_INBOUND TPROXY"]
    assert [o.source for o in found.origins[15001]] == ["ip6tables-nft"]
    assert [o.source for o in found.origins[4140]] == ["iptables-legacy"]
    assert [(o.source, o.target) for o in found.origins[15008]] == [("nft", "tproxy")]
    assert set(found.sources_read) == {
        "iptables-nft",
        "ip6tables-nft",
        "iptables-legacy",
        "ip6tables-legacy",
        "nft",
    }


def test_a_netns_without_rules_has_no_capture_ports() -> None:
    skip_unless_root("iptables", "nft")
    with scratch_netns("cp0") as ns, NetnsHandle.from_name(ns) as handle:
        found = detect(handle)
    assert found.ports == frozenset() and found.sources_read


def _path_with(tmp_path: Path, *tools: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("nsenter", *tools):
        for d in os.environ.get("PATH", "").split(os.pathsep):
            if (Path(d) / tool).exists():
                (bindir / tool).symlink_to(Path(d) / tool)
                break
    return str(bindir)


def test_no_readable_source_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    skip_unless_root("nsenter")
    with (
        scratch_netns("cp1") as ns,
        NetnsHandle.from_name(ns) as handle,
        monkeypatch.context() as m,
    ):
        m.setenv("PATH", _path_with(tmp_path))
        with pytest.raises(UserError, match=r"cannot read NAT rules .*pass --capture-ports"):
            detect(handle)


def test_one_readable_source_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_root("nsenter", "nft")
    with scratch_netns("cp2") as ns, NetnsHandle.from_name(ns) as handle:
        run("nft", "add table ip mesh", netns=ns)
        run("nft", "add chain ip mesh out { type nat hook output priority -100; }", netns=ns)
        run("nft", "add rule ip mesh out tcp dport 7777 redirect to :15001", netns=ns)
        with monkeypatch.context() as m:
            m.setenv("PATH", _path_with(tmp_path, "nft"))
            found = detect(handle)
    assert found.ports == {15001}
    assert found.sources_read == ("nft",)
    assert set(found.sources_failed) == {
        "iptables-nft",
        "ip6tables-nft",
        "iptables-legacy",
        "ip6tables-legacy",
    }
