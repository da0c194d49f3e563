"""A listed port without NAT proves no leak (design.md §2 part 2), on the real kernel.

``--capture-ports 8080`` on a plain server: the server half-closed three
connections (its sockets FIN-WAIT-2), their clients are idle and would close
normally later, and their conntrack entries have expired (conntrack is active
in the netns because another rule needs it, and another connection keeps the
table non-empty).  Without NAT the clients' late FINs are delivered normally:
nothing leaks.  The proof finds no TCP NAT rule and no DST_NAT entry for
8080, so these are ``unproven`` (not-nat-captured) and nothing is killed.

Before the proof (commit 33bbaae) the same ``scan --action kill --min-idle 0``
called all three "leaked", killed them and said "the proxy closed 3 of its
CLOSE-WAIT upstream socket(s)" where there is no proxy (the clients' own
sockets in the same netns were taken for upstream legs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from support.scratchnet import holder, run, scratch_netns, skip_unless_root, ss, wait_for

pytestmark = pytest.mark.kernel

CLOSE_WAIT = 1  # the netns's close_wait timeout: the entries expire fast
COUNT = 3

# A plain server on 8080 half-closes COUNT connections from clients in the same
# netns; a connection on 9000 stays idle and keeps the conntrack table non-empty.
SERVER = f"""
import socket
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 8080)); srv.listen(16)
keep = socket.socket(); keep.bind(("127.0.0.1", 9000)); keep.listen(1)
other = socket.create_connection(("127.0.0.1", 9000)); other_srv, _ = keep.accept()
held = []
for _ in range({COUNT}):
    c = socket.create_connection(("127.0.0.1", 8080))
    s, _ = srv.accept()
    s.shutdown(socket.SHUT_WR)  # the server is done; the client will close later
    held += [c, s]
"""


def halfclose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "halfclose", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def server_fin_wait2(netns: str) -> list[str]:
    return [ln for ln in ss(netns, "state", "fin-wait-2") if "127.0.0.1:8080 " in ln]


def test_listed_port_without_nat_is_unproven_and_never_killed() -> None:
    skip_unless_root("iptables", "conntrack", "ss")
    with scratch_netns("plain") as ns:
        # conntrack active in this netns because of a rule for another port.
        run(
            "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9",
            "-j", "REDIRECT", "--to-ports", "15001", netns=ns,
        )  # fmt: skip
        run(
            "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_timeout_close_wait={CLOSE_WAIT}",
            netns=ns,
        )  # fmt: skip
        with holder(ns, SERVER):
            wait_for(lambda: len(server_fin_wait2(ns)) == COUNT, timeout=5)
            # Let the half-closed entries expire (polling bounded in time).
            deadline = time.monotonic() + 10
            while "port=8080 " in run("conntrack", "-L", netns=ns, check=False).stdout:
                assert time.monotonic() < deadline, "entries did not expire"
                time.sleep(0.2)
            time.sleep(CLOSE_WAIT + 0.2)  # silent longer than any entry could live
            table = halfclose(
                "scan", "--netns", ns, "--capture-ports", "8080",
                "--action", "kill", "--min-idle", "0",
            )  # fmt: skip
            doc: dict[str, Any] = json.loads(
                halfclose(
                    "scan", "--netns", ns, "--capture-ports", "8080",
                    "--action", "kill", "--min-idle", "0", "--output", "json",
                ).stdout
            )  # fmt: skip
            left = server_fin_wait2(ns)
    assert table.returncode == 0, table.stderr
    assert "proxy closed" not in table.stdout
    assert "killed nothing" in table.stdout
    assert f"{COUNT} unproven" in table.stdout.splitlines()[0]
    mine = [f for f in doc["findings"] if f["local"] == "127.0.0.1:8080"]
    assert len(mine) == COUNT
    for f in mine:
        assert (f["kind"], f.get("reason"), f["action"]) == ("unproven", "not-nat-captured", "none")
    assert doc["kill_summary"]["killed"] == 0
    assert len(left) == COUNT  # the server's sockets are untouched
