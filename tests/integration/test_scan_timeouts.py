"""Part 4's bar comes from the scanned netns's own timeouts, as they are now.

The scanner keeps the two sysctl files of its netns open (``TimeoutFiles``:
opening means entering the netns) and re-reads them.  This checks that what
it reads is the scanned netns's value (not the reader's, the host's or
another pod's) and that a change is seen at the next refresh, not frozen at
open time.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from halfclose.agent.core.model import HalfClosedTimeouts, UnprovenReason
from halfclose.agent.engine.scan import (
    CLOSE_WAIT_TIMEOUT,
    FIN_WAIT_TIMEOUT,
    Scanner,
    ScanSettings,
    TimeoutFiles,
)
from halfclose.agent.kernel.netns import NetnsHandle
from support.scratchnet import run, scratch_netns, skip_unless_root

pytestmark = pytest.mark.kernel

FRESH = ScanSettings(timeouts_max_age_seconds=0.0)


def set_timeouts(ns: str, close_wait: int, fin_wait: int) -> None:
    run("sysctl", "-qw", f"{CLOSE_WAIT_TIMEOUT}={close_wait}", netns=ns)
    run("sysctl", "-qw", f"{FIN_WAIT_TIMEOUT}={fin_wait}", netns=ns)


def host_close_wait() -> int:
    with open("/proc/sys/" + CLOSE_WAIT_TIMEOUT.replace(".", "/")) as f:
        return int(f.read())


def test_each_scanner_reads_its_own_netns_and_sees_changes() -> None:
    skip_unless_root("sysctl")
    host = host_close_wait()
    # Values no other netns here has (the host's differs too).
    a_cw, b_cw = (host % 1000) + 1001, (host % 1000) + 2002
    with (
        scratch_netns("tmo-a") as a,
        scratch_netns("tmo-b") as b,
        NetnsHandle.from_name(a) as ha,
        NetnsHandle.from_name(b) as hb,
        Scanner(ha) as sa,
        Scanner(hb) as sb,
    ):
        set_timeouts(a, a_cw, 50)
        set_timeouts(b, b_cw, 60)
        assert sa.timeouts(FRESH) == HalfClosedTimeouts(a_cw, 50)
        assert sb.timeouts(FRESH) == HalfClosedTimeouts(b_cw, 60)
        # Changed after the files were opened: the next refresh sees it.
        set_timeouts(a, 3, 40)
        assert sa.timeouts(FRESH) == HalfClosedTimeouts(3, 40)
        assert sb.timeouts(FRESH) == HalfClosedTimeouts(b_cw, 60)
        # Within the cache's age the answer is kept (the agent's setting).
        kept = ScanSettings(timeouts_max_age_seconds=60.0)
        set_timeouts(a, 4, 40)
        assert sa.timeouts(kept) == HalfClosedTimeouts(3, 40)
        assert sa.timeouts(FRESH) == HalfClosedTimeouts(4, 40)
    assert host_close_wait() == host


def test_files_closed_with_the_scanner_and_reopened_after_a_failed_read() -> None:
    skip_unless_root("sysctl")
    with scratch_netns("tmo-c") as ns, NetnsHandle.from_name(ns) as h:
        set_timeouts(ns, 7, 70)
        before = set(os.listdir("/proc/self/fd"))
        with Scanner(h) as s:
            assert s.timeouts(FRESH) == HalfClosedTimeouts(7, 70)
        assert set(os.listdir("/proc/self/fd")) <= before  # nothing left open
        files = TimeoutFiles(h)
        try:
            assert files.read() == HalfClosedTimeouts(7, 70)
            # A file that cannot be read any more: answered by a fresh open.
            fds = files._fds
            assert fds is not None
            os.close(fds[0])
            with contextlib.suppress(OSError):
                os.close(fds[1])
            set_timeouts(ns, 8, 80)
            assert files.read() == HalfClosedTimeouts(8, 80)
        finally:
            files.close()


def test_missing_sysctls_are_conntrack_inactive(tmp_path: os.PathLike[str]) -> None:
    """A proc root without the files (nf_conntrack not loaded there): no bar."""
    skip_unless_root()
    with scratch_netns("tmo-d") as ns, NetnsHandle.from_name(ns) as h:
        files = TimeoutFiles(h)
        assert files.read(str(tmp_path)) is UnprovenReason.CONNTRACK_INACTIVE
        started = time.monotonic()
        assert isinstance(files.read(), HalfClosedTimeouts)  # the real root: read
        assert time.monotonic() - started < 5
        files.close()
