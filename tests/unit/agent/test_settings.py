"""Agent settings from the environment: defaults, and bad input as one clear error."""

from __future__ import annotations

import pytest

from halfclose.agent.daemon.settings import AgentSettings
from halfclose.errors import UserError


def test_defaults() -> None:
    s = AgentSettings.from_env({"NODE_NAME": "n1"})
    assert (s.node_name, s.host_proc, s.metrics_port, s.kubeconfig, s.log_level, s.state_dir) == (
        "n1",
        "/proc",
        9479,
        None,
        "INFO",
        "/run/halfclose",
    )


def test_overrides(tmp_path: object) -> None:
    s = AgentSettings.from_env(
        {
            "NODE_NAME": " n2 ",
            "HOST_PROC": "/proc/",
            "METRICS_PORT": "9000",
            "KUBECONFIG": "/k",
            "LOG_LEVEL": "debug",
            "STATE_DIR": "/tmp/x/",
        }
    )
    assert (s.node_name, s.host_proc, s.metrics_port, s.kubeconfig, s.log_level, s.state_dir) == (
        "n2",
        "/proc",
        9000,
        "/k",
        "DEBUG",
        "/tmp/x",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "NODE_NAME is not set"),
        ({"NODE_NAME": "  "}, "NODE_NAME is not set"),
        ({"NODE_NAME": "n", "METRICS_PORT": "x"}, "METRICS_PORT must be a port number"),
        ({"NODE_NAME": "n", "METRICS_PORT": "70000"}, "METRICS_PORT must be 0..65535"),
        ({"NODE_NAME": "n", "HOST_PROC": "/nonexistent-proc"}, "is not a directory"),
        ({"NODE_NAME": "n", "LOG_LEVEL": "loud"}, "LOG_LEVEL must be"),
    ],
)
def test_bad_input(env: dict[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        AgentSettings.from_env(env)
