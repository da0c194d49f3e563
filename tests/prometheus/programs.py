"""The agent and the operator as separate processes, started as in production.

Each runs its console script (``halfclose-agent``, ``halfclose-operator``, the
commands of the chart's containers), configured only by the environment and
flags the chart sets.  The agent runs as root with its bounding set cut to the
chart's three capabilities (``setpriv``), or to fewer to make a fault; its
metrics port is picked free on 127.0.0.1.  ``stop()`` sends SIGTERM, then
SIGKILL after a bound; every process started is stopped at teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from prometheus.promserver import die_with_parent, free_port

BIN = Path(sys.executable).parent
FAULTSHIM = Path(__file__).resolve().parent / "faultshim"
# The capabilities the chart's DaemonSet gives the agent with agent.hostPID
# (templates/agent/daemonset.yaml): pods are found through HOST_PROC=/proc, the
# path the fake containers of tests/support/podcgroup.py give.
CHART_CAPS = ("net_admin", "sys_admin", "sys_ptrace")
STOP_TIMEOUT = 15.0


class Program:
    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path, port: int
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Program:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only sets PDEATHSIG
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def log(self, tail: int = 6000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-tail:]
        return ""


def _base_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def agent(
    *,
    node: str,
    kubeconfig: str,
    workdir: Path,
    caps: Sequence[str] = CHART_CAPS,
    refuse_destroy_in: Sequence[int] = (),
    port: int | None = None,
) -> Program:
    """``halfclose-agent`` for ``node``, with the bounding set ``caps``.

    ``refuse_destroy_in``: netns inodes where the kernel refuses SOCK_DESTROY
    (faultshim/sitecustomize.py); empty means no fault at all.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("setpriv (util-linux) is not installed")
    state = workdir / f"agent-{node}-state"
    state.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = _base_env()
    env.update(
        NODE_NAME=node,
        HOST_PROC="/proc",
        METRICS_PORT=str(port),
        LOG_LEVEL="INFO",
        STATE_DIR=str(state),
        KUBECONFIG=kubeconfig,
    )
    if refuse_destroy_in:
        env["PYTHONPATH"] = str(FAULTSHIM)
        env["HALFCLOSE_TEST_FAULT_SOCK_DESTROY"] = ",".join(map(str, refuse_destroy_in))
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    argv = [setpriv, "--bounding-set", bounding, "--inh-caps", "-all", str(BIN / "halfclose-agent")]
    return Program(f"agent {node}", argv, env, workdir / f"agent-{node}.log", port)


def operator(*, kubeconfig: str, workdir: Path) -> Program:
    """``halfclose-operator``, one replica (no leader election), metrics on a free port."""
    port = free_port()
    env = _base_env()
    argv = [
        str(BIN / "halfclose-operator"),
        "--standalone",
        f"--kubeconfig={kubeconfig}",
        f"--metrics-port={port}",
        "--liveness-port=0",
        "--debounce-seconds=0.5",
    ]
    return Program("operator", argv, env, workdir / "operator.log", port)


def wait_http(program: Program, path: str, timeout: float) -> None:
    """Until the program answers ``path`` on its port (bounded; fails if it exits)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{program.port}{path}"
    while True:
        if not program.running:
            raise AssertionError(f"{program.name} exited:\n{program.log()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{program.name}: {url} not up in {timeout}s:\n{program.log()}")
        time.sleep(0.2)
