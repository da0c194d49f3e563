"""Network namespaces and commands run inside them (the lab's kernel edge).

Commands enter a namespace with ``nsenter --net`` (or the tool's own ``-n`` /
``-N`` flag) rather than ``ip netns exec``: the lab needs only the network
namespace, and skipping ``ip netns exec``'s mount-namespace dance makes a
hundred-pod lab noticeably faster to build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence

from halfclose.lab.errors import LabError

NETNS_DIR = "/run/netns"
COMMAND_TIMEOUT = 60.0


def path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def names() -> list[str]:
    """Named network namespaces (what ``ip netns list`` shows)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def require_tools(tools: Iterable[str]) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` not found on PATH: install it (see .ci/system-deps)")


def run(argv: Sequence[str], *, stdin: str | None = None, what: str | None = None) -> str:
    """Run a command; a failure becomes a one-line LabError naming what failed."""
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError(f"`{argv[0]}` not found on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what or argv[0]}: timed out after {COMMAND_TIMEOUT:.0f}s") from exc
    if done.returncode != 0:
        detail = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise LabError(f"{what or ' '.join(argv[:3])} failed: {detail}")
    return done.stdout


def enter_argv(name: str, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs inside netns ``name``."""
    return ["nsenter", f"--net={path(name)}", "--", *argv]


def run_in(name: str, argv: Sequence[str], *, stdin: str | None = None) -> str:
    return run(enter_argv(name, argv), stdin=stdin, what=f"{argv[0]} in netns {name}")


def add(new: Sequence[str]) -> None:
    run(["ip", "-batch", "-"], stdin="".join(f"netns add {n}\n" for n in new), what="ip netns add")


def ip_batch(name: str, lines: Sequence[str]) -> None:
    run(["ip", "-n", name, "-batch", "-"], stdin="\n".join(lines) + "\n", what=f"ip in {name}")


def delete(gone: Sequence[str]) -> None:
    """Delete namespaces, ignoring ones already gone (``-force``: keep going)."""
    present = [n for n in gone if exists(n)]
    if present:
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"netns del {n}\n" for n in present),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (``ip netns pids``, in-process)."""
    try:
        target = os.stat(path(name))
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # exited, or a kernel thread
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
            found.append(int(entry))
    return sorted(found)


def read_sysctl(name: str, key: str) -> str:
    return run_in(name, ["sysctl", "-n", key]).strip()


def write_sysctl(name: str, key: str, value: str) -> None:
    run_in(name, ["sysctl", "-q", "-w", f"{key}={value}"])
