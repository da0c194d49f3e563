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
    # The runtime's netns bind mounts (chart default, no hostPID): pods are
    # resolved there by IP (kernel.mountns). None: by container ID through
    # host_proc (agent.hostPID).
    netns_dir: str | None = None
    # The procfs whose /sys/net the net.* sysctls are read and written through
    # (the chart's writable host mount with agent.sysctlPatching); None: host_proc.
    sysctl_proc: str | None = None
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
    # /metrics behind TokenReview + SubjectAccessReview (halfclose.metricsauth).
    metrics_auth: bool = False
    metrics_auth_cache_seconds: float = 60.0

    @property
    def sysctl_root(self) -> str:
        return self.sysctl_proc or self.host_proc

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
        netns_dir = env.get("NETNS_DIR", "").strip().rstrip("/") or None
        if netns_dir is not None and not os.path.isdir(netns_dir):
            raise UserError(f"NETNS_DIR {netns_dir!r} is not a directory")
        sysctl_proc = env.get("SYSCTL_PROC", "").strip().rstrip("/") or None
        if sysctl_proc is not None and not os.path.isdir(f"{sysctl_proc}/sys/net"):
            raise UserError(f"SYSCTL_PROC {sysctl_proc!r} has no sys/net directory")
        auth_text = env.get("METRICS_AUTH", "").strip().lower()
        if auth_text not in ("", "0", "1", "false", "true"):
            raise UserError(f"METRICS_AUTH must be true or false, not {auth_text!r}")
        ttl_text = env.get("METRICS_AUTH_CACHE_SECONDS", "60").strip()
        try:
            ttl = float(ttl_text)
        except ValueError:
            ttl = -1.0
        if not 1 <= ttl <= 3600:
            raise UserError(f"METRICS_AUTH_CACHE_SECONDS must be 1..3600, not {ttl_text!r}")
        level = env.get("LOG_LEVEL", "INFO").strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise UserError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
        return cls(
            node_name=node,
            host_proc=host_proc,
            netns_dir=netns_dir,
            sysctl_proc=sysctl_proc,
            metrics_auth=auth_text in ("1", "true"),
            metrics_auth_cache_seconds=ttl,
            metrics_port=port,
            kubeconfig=env.get("KUBECONFIG") or None,
            log_level=level,
            state_dir=env.get("STATE_DIR", "/run/halfclose").rstrip("/") or "/run/halfclose",
        )
