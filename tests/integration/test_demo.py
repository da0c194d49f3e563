"""``halfclose demo`` end to end, as a subprocess (it is also an end-to-end check).

The demo verifies each of its own claims on the kernel and exits non-zero when
one does not hold; this test adds that it ran every step, said the key
things, finished in time and left no namespace behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

from halfclose.lab import Lab, LabSettings

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the demo builds a netns lab"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("ip", "iptables", "conntrack")),
        reason="needs ip, iptables and conntrack",
    ),
]

BUDGET = 60.0  # the promise: under a minute


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def run_demo(prefix: str) -> tuple[int, str, str]:
    """Run the demo bounded; on overrun SIGTERM it (it tears the lab down), then kill."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "halfclose", "demo", "--prefix", prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=BUDGET + 30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return proc.returncode, out, err


def test_demo_runs_every_step_and_cleans_up() -> None:
    prefix = f"hcd-{secrets.token_hex(2)}"
    started = time.monotonic()
    try:
        rc, out, err = run_demo(prefix)
    finally:
        # Whatever happened, nothing of this lab survives the test.
        Lab(LabSettings(prefix=prefix)).down()
    elapsed = time.monotonic() - started
    assert rc == 0, f"demo failed ({rc}):\n{out}\n{err}"
    for line in (
        "== 1/6",
        "FIN-WAIT-2",
        "CLOSE-WAIT",
        "CLOSE_WAIT,",  # the live NAT entry next to the sockets
        "none: expired",  # ... and its absence once the leak formed
        "classifies all 3 as leaked",
        "$ halfclose scan --netns",
        "--action kill",
        "both proxy sockets of every leaked pair are gone",
        "--action extend-conntrack",
        "nothing leaked",
        "--action patch-conntrack",
        "$ halfclose conntrack restore",
        "== 6/6",
        "Demo complete",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    # Not a TTY: the progress is one line per wait, no carriage returns.
    assert "\r" not in out and "... done after" in out
    assert elapsed < BUDGET, f"demo took {elapsed:.1f}s"
    assert not {n for n in netns_names() if n.startswith(prefix)}


def test_demo_rejects_bad_input_without_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "halfclose", "demo", "--connections", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
