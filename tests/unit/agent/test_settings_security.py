"""The agent settings of issue 13: where pods are found, where sysctls are written,
whether /metrics needs a token (each bad value: one line, exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from halfclose.agent.daemon.settings import AgentSettings
from halfclose.errors import UserError


def test_defaults_keep_the_pid_path_and_open_metrics() -> None:
    s = AgentSettings.from_env({"NODE_NAME": "n"})
    assert s.netns_dir is None and s.sysctl_proc is None and s.sysctl_root == "/proc"
    assert s.metrics_auth is False and s.metrics_auth_cache_seconds == 60.0


def test_the_charts_default_environment(tmp_path: Path) -> None:
    netns = tmp_path / "netns"
    netns.mkdir()
    proc = tmp_path / "proc"
    (proc / "sys" / "net").mkdir(parents=True)
    s = AgentSettings.from_env({
        "NODE_NAME": "n",
        "NETNS_DIR": f"{netns}/",
        "SYSCTL_PROC": str(proc),
        "METRICS_AUTH": "true",
        "METRICS_AUTH_CACHE_SECONDS": "30",
    })  # fmt: skip
    assert s.netns_dir == str(netns)
    assert s.sysctl_root == str(proc) and s.host_proc == "/proc"
    assert s.metrics_auth is True and s.metrics_auth_cache_seconds == 30.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NETNS_DIR": "/nonexistent-netns"}, "NETNS_DIR"),
        ({"SYSCTL_PROC": "/nonexistent-proc"}, "SYSCTL_PROC"),
        ({"METRICS_AUTH": "maybe"}, "METRICS_AUTH"),
        ({"METRICS_AUTH_CACHE_SECONDS": "0"}, "METRICS_AUTH_CACHE_SECONDS"),
        ({"METRICS_AUTH_CACHE_SECONDS": "soon"}, "METRICS_AUTH_CACHE_SECONDS"),
    ],
)
def test_bad_values_are_one_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        AgentSettings.from_env({"NODE_NAME": "n", **env})
