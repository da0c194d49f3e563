"""The agent's settings: typed, built from the environment only in ``main``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from halfclose.errors import UserError

DEFAULT_METRICS_PORT = 9479


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything the agent needs to know about where it runs.

    ``kubeconfig`` None means in-cluster (the pod's service account).
    ``state_dir`` holds what must survive a restart (the remediation engine's
    records of patched sysctls live under ``<state_dir>/conntrack``).
    """

    node_name: str
    host_proc: str = "/proc"
    metrics_host: str = "0.0.0.0"  # noqa: S104 - the metrics port is scraped from outside the pod
    metrics_port: int = DEFAULT_METRICS_PORT
    kubeconfig: str | None = None
    log_level: str = "INFO"
    state_dir: str = "/run/halfclose"
    # How long a netns may stay unscanned when no policy interval says otherwise.
    default_scan_interval_seconds: float = 30.0
    # Conntrack DESTROY events are batched this long before the scan they trigger.
    event_debounce_seconds: float = 0.15
    # Seconds to let buffered report writes drain on SIGTERM.
    shutdown_flush_seconds: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AgentSettings:
        env = os.environ if env is None else env
        node = env.get("NODE_NAME", "").strip()
        if not node:
            raise UserError(
                "NODE_NAME is not set (the DaemonSet sets it from spec.nodeName via the "
                "downward API)"
            )
        port_text = env.get("METRICS_PORT", str(DEFAULT_METRICS_PORT)).strip()
        try:
            port = int(port_text)
        except ValueError:
            raise UserError(f"METRICS_PORT must be a port number, not {port_text!r}") from None
        if not 0 <= port <= 65535:
            raise UserError(f"METRICS_PORT must be 0..65535, not {port}")
        host_proc = env.get("HOST_PROC", "/proc").rstrip("/") or "/proc"
        if not os.path.isdir(host_proc):
            raise UserError(f"HOST_PROC {host_proc!r} is not a directory")
        level = env.get("LOG_LEVEL", "INFO").strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise UserError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
        return cls(
            node_name=node,
            host_proc=host_proc,
            metrics_port=port,
            kubeconfig=env.get("KUBECONFIG") or None,
            log_level=level,
            state_dir=env.get("STATE_DIR", "/run/halfclose").rstrip("/") or "/run/halfclose",
        )
