"""What every lab daemon (proxy, upstream, app holder) does the same way.

A daemon is started by ``supervise.launch`` with stdout on a pipe: it prints
``ready`` once it is serving and then lets go of the pipe, so the launcher
waits for exactly that instead of sleeping.  It stops on SIGTERM/SIGINT and,
as a safety net for a lab nobody took down, after ``max_lifetime`` seconds.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import signal
from collections.abc import Callable, Coroutine
from typing import Any

_PR_SET_DUMPABLE = 4
_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def set_process_name(name: str) -> None:
    """Set the kernel's comm name (what ``ss -p``, ``ps -o comm`` and /proc show)."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (a proxy holds two fds per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def drop_privileges(uid: int, gid: int) -> None:
    if os.getuid() == uid and os.getgid() == gid:
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    # Changing uid made us non-dumpable, which leaves /proc/<pid> owned by root.
    # A real sidecar is exec'd by the container runtime already as its uid and
    # stays dumpable, so its /proc/<pid>/fd is that uid's (mode 0500): an agent
    # without CAP_DAC_READ_SEARCH cannot list it.  Be that process.
    if _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}")


def announce_ready() -> None:
    """Tell the launcher we serve, then detach stdout from its pipe."""
    os.write(1, b"ready\n")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def setup_logging(name: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s",
    )


Serve = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def run(serve: Serve, *, name: str, max_lifetime: float) -> int:
    """Run ``serve(stop)`` until it returns; ``stop`` is set on SIGTERM/SIGINT or at end of life.

    ``serve`` sets up, calls ``announce_ready()``, awaits ``stop.wait()`` and
    cleans up.
    """
    set_process_name(name)
    setup_logging(name)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(max_lifetime, stop.set)
        await serve(stop)

    asyncio.run(main())
    return 0
