"""Entering a network namespace: a handle, netlink sockets made inside it, commands run in it.

``setns(2)`` changes the namespace of the calling *thread* only.  We switch the
current thread in, create the socket, and switch back in a ``finally``: a socket
stays bound to the netns it was created in, so the rest of the program may use
it from any thread (docs/detection.md, codec notes).  Python 3.11 has no ``os.setns``; libc's is
called through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from halfclose.errors import NetnsGone, PermissionDenied, UserError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

T = TypeVar("T")

# The interpreter's own symbols, libc's among them (dlopen(NULL)):
# ctypes.util.find_library("c") ran `ldconfig -p` (~9 ms) at every import and
# pulled in tempfile, shutil, bz2 and lzma (~0.8 MiB of the CLI's RSS).
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def require_root() -> None:
    if os.geteuid() != 0:
        raise UserError("must run as root (entering network namespaces needs CAP_SYS_ADMIN)")


PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread


def is_kernel_thread(pid: int, proc_root: str = "/proc") -> bool:
    """From /proc/<pid>/stat's flags (field 9); False when unreadable."""
    try:
        with open(f"{proc_root}/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    # The comm field is in parentheses and may itself hold spaces or ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return bool(int(fields[6]) & PF_KTHREAD)
    except (IndexError, ValueError):
        return False


def host_netns_path(proc_root: str = "/proc") -> str:
    """A path to the host's netns: pid 1's, else kthreadd's (kernel threads live in init_net).

    pid 1's may be unreadable (a supervisor that forbids ptrace access), and
    in a container's pid namespace pid 2 is no kernel thread: the first
    readable reference wins.  OSError when there is none.
    """
    first = f"{proc_root}/1/ns/net"
    try:
        os.stat(first)
        return first
    except OSError as exc:
        if is_kernel_thread(2, proc_root):
            second = f"{proc_root}/2/ns/net"
            os.stat(second)
            return second
        raise exc from None


def _fault(exc: OSError) -> type[UserError]:
    """The typed error for a failed open/setns: EPERM is no missing netns."""
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied
    if exc.errno in (errno.ENOENT, errno.ESRCH):
        return NetnsGone
    return UserError


class NetnsHandle:
    """An open network namespace (an fd on its nsfs inode).

    Holding the fd pins the namespace: a pod whose processes all exit keeps
    its netns alive while we look at it, and a recycled pid cannot swap it.
    """

    def __init__(self, fd: int, path: str, label: str) -> None:
        self._fd = fd
        self.path = path
        self.label = label  # what reports call it: the name, the path, or "pid:N"
        st = os.fstat(fd)
        self.inode = st.st_ino
        self.dev = st.st_dev

    # -- constructors ---------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> NetnsHandle:
        if not name or "/" in name or name in (".", ".."):
            raise UserError(f"invalid netns name {name!r}")
        return cls._open(os.path.join(NETNS_RUN_DIR, name), name, f"netns {name!r}")

    @classmethod
    def from_path(cls, path: str) -> NetnsHandle:
        return cls._open(path, path, f"netns path {path!r}")

    @classmethod
    def from_pid(cls, pid: int, proc_root: str = "/proc") -> NetnsHandle:
        if pid <= 0:
            raise UserError(f"invalid pid {pid}")
        path = f"{proc_root}/{pid}/ns/net"
        if not os.path.exists(f"{proc_root}/{pid}"):
            raise NetnsGone(f"no such process: pid {pid}")
        return cls._open(path, f"pid:{pid}", f"the netns of pid {pid}")

    @classmethod
    def from_spec(cls, spec: str) -> NetnsHandle:
        """A name from ``ip netns`` or a path (anything containing a ``/``)."""
        return cls.from_path(spec) if "/" in spec else cls.from_name(spec)

    @classmethod
    def _open(cls, path: str, label: str, what: str) -> NetnsHandle:
        require_root()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsGone(f"{what} does not exist ({path})") from None
        except PermissionError as exc:
            raise PermissionDenied(f"cannot open {what} ({path}): {exc.strerror}") from None
        except OSError as exc:
            raise _fault(exc)(f"cannot open {what} ({path}): {exc.strerror}") from None
        handle = cls(fd, path, label)
        # Prove it is a netns we can enter before anyone relies on it: a
        # regular file or another namespace type fails here with EINVAL.
        try:
            handle.run(lambda: None)
        except OSError as exc:
            handle.close()
            if exc.errno == errno.EINVAL:
                # setns() says EINVAL for a file that is not a network namespace.
                raise UserError(f"{path} is not a network namespace") from None
            raise _fault(exc)(f"cannot enter {what} ({path}): {exc.strerror}") from None
        return handle

    def is_host(self, proc_root: str = "/proc") -> bool:
        """Is this the host's network namespace (init_net)?

        Kernel threads and every process of the init netns share it; a scan
        or an action there touches the node itself, so callers refuse it
        unless it was asked for by path.  Raises OSError when no reference
        for the host netns can be read (then nobody can tell: callers refuse).
        """
        st = os.stat(host_netns_path(proc_root))
        return (st.st_dev, st.st_ino) == (self.dev, self.inode)

    # -- use ------------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("netns handle is closed")
        return self._fd

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with the *current thread* inside this netns, then switch back.

        Only code that creates namespace-bound objects (sockets) or opens
        /proc/sys/net files belongs in the body: anything else the thread does
        meanwhile also happens in the target netns.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self.fd)
            try:
                yield
            finally:
                # Failing to return would leave this thread in a pod's netns
                # for the rest of its life: that must be loud.
                _setns(own)
        finally:
            os.close(own)

    def run(self, fn: Callable[[], T]) -> T:
        with self.entered():
            return fn()

    def socket(self, family: int, type_: int, proto: int) -> socket.socket:
        """A socket created inside this netns (usable from any thread afterwards)."""
        with self.entered():
            return socket.socket(family, type_ | socket.SOCK_CLOEXEC, proto)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this netns.

        nsenter gets our own fd by /proc/self/fd, so the namespace is the one
        this handle pinned, even if a pid or a name was recycled since.
        """
        return ["nsenter", f"--net=/proc/self/fd/{self.fd}", "--", *argv]

    def run_command(
        self, argv: Sequence[str], timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            pass_fds=(self.fd,),
            check=False,
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> NetnsHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetnsHandle({self.label!r}, inode={self.inode})"
