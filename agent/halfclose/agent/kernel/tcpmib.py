"""A netns's TCP counters (``/proc/net/snmp``'s ``Tcp:`` line): has any TCP segment arrived?

Why the agent asks: a sock_diag dump walks the kernel's host-wide TCP hash
(every socket of every netns) even when the netns has no socket to report,
so an idle netns's scan costs in proportion to the node's sockets (0.5-10 ms
here).  A socket reaches FIN_WAIT2 or CLOSE_WAIT only by receiving a segment
(the ACK of its FIN, the peer's FIN), and the kernel counts every received
TCP segment in the receiving netns's ``InSegs`` on arrival, before it
processes it.  So when a dump of a netns found no such socket, and its
``Tcp:`` counters have not moved from a while before that dump (time for
the segments counted to be processed) until now, a dump now would find none
either (``engine/scan.py`` skips it, for a bounded time).

The file is opened once inside the netns, through ``/proc/thread-self/net``
(``/proc/net`` is the main thread's netns); an fd of a ``/proc/net`` file
reads the netns it was opened in on every read, like a sysctl's
(``kernel/sysctl.py``).
"""

from __future__ import annotations

import contextlib
import os

from halfclose.agent.kernel.netns import NetnsHandle

_TCP = b"\nTcp: "


def tcp_values(snmp: bytes) -> bytes | None:
    """The values line of ``Tcp:`` in a ``/proc/net/snmp`` text (the second ``Tcp:`` line)."""
    head = snmp.find(_TCP)
    values = snmp.find(_TCP, head + 1) if head >= 0 else -1
    if values < 0:
        return None
    end = snmp.find(b"\n", values + 1)
    return snmp[values + 1 : end if end >= 0 else len(snmp)]


class TcpCounters:
    """One netns's ``Tcp:`` counters, from an fd kept open."""

    __slots__ = ("_fd", "_handle", "_root")

    def __init__(self, handle: NetnsHandle) -> None:
        self._handle = handle
        self._fd: int | None = None
        self._root = ""

    def read(self, proc_root: str = "/proc") -> bytes | None:
        """The counters now (opaque: compare for equality), or None if unreadable."""
        if self._fd is None or self._root != proc_root:
            self.close()
            try:
                with self._handle.entered():
                    self._fd = os.open(
                        os.path.join(proc_root, "thread-self", "net", "snmp"),
                        os.O_RDONLY | os.O_CLOEXEC,
                    )
            except OSError:
                return None
            self._root = proc_root
        try:
            return tcp_values(os.pread(self._fd, 16384, 0))
        except OSError:
            self.close()
            return None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
