"""Test-only fault: the kernel refuses SOCK_DESTROY in chosen network namespaces.

Loaded by Python at start-up (``sitecustomize``) when this directory is on
PYTHONPATH, which only tests/prometheus does, for the agent process it starts.
With ``HALFCLOSE_TEST_FAULT_SOCK_DESTROY=<netns inode>,...`` every SOCK_DESTROY
request sent on a sock_diag socket of one of those netns fails with
EOPNOTSUPP, the answer of a kernel built without CONFIG_INET_DIAG_DESTROY: the
situation the HalfCloseKillFailures alert is written for, which no capability
setting can produce (sock_diag dumps, conntrack and SOCK_DESTROY all need the
same CAP_NET_ADMIN).  Everything else the agent does is untouched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

_ENV = "HALFCLOSE_TEST_FAULT_SOCK_DESTROY"
_NETLINK_SOCK_DIAG = 4
_SOCK_DESTROY = 21
_SIOCGSKNS = 0x894C  # a socket's netns as a new fd


def _netns_inode(sock: socket.socket) -> int | None:
    try:
        fd = fcntl.ioctl(sock.fileno(), _SIOCGSKNS)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _install(inodes: frozenset[int]) -> None:
    real_send = socket.socket.send

    def send(self: socket.socket, data: bytes, flags: int = 0, /) -> int:
        if (
            self.family == socket.AF_NETLINK
            and self.proto == _NETLINK_SOCK_DIAG
            and len(data) >= 6
            and struct.unpack_from("=H", data, 4)[0] == _SOCK_DESTROY
            and _netns_inode(self) in inodes
        ):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_send(self, data, flags)

    socket.socket.send = send  # type: ignore[method-assign]


_spec = os.environ.get(_ENV, "")
if _spec:
    _install(frozenset(int(x) for x in _spec.split(",") if x.strip()))
