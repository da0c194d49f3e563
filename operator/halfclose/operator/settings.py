"""The operator's settings: one typed object, built only at the entry point."""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from halfclose.errors import UserError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorSettings:
    """How the operator runs (``halfclose-operator --help`` lists the flags).

    ``metrics_port`` serves /metrics and /readyz; 0 picks a free port (tests).
    ``liveness_port`` is kopf's /healthz; None disables it.
    ``debounce_seconds`` is the most often one policy's status is written.
    ``peering`` names the ClusterKopfPeering object replicas share; None runs
    standalone (no leader election: one replica only).  ``kubeconfig`` None means
    the pod's service account (else ~/.kube/config).  ``priority`` orders
    replicas: the highest runs, the others stand by.  It is random per process
    by default because kopf pauses *every* replica when two share a priority.
    """

    metrics_port: int = 9480
    metrics_host: str = "0.0.0.0"  # noqa: S104 -- a pod serves its probes on all addresses
    liveness_port: int | None = 8080
    debounce_seconds: float = 2.0
    log_level: str = "INFO"
    peering: str | None = "halfclose"
    priority: int = 0
    kubeconfig: str | None = None
    # /metrics behind TokenReview + SubjectAccessReview (halfclose.metricsauth).
    metrics_auth: bool = False
    metrics_auth_cache_seconds: float = 60.0


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def _priority(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 300:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0.05-300)")
    return value


def _cache_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (1-3600)")
    return value


def settings_from(argv: Sequence[str] | None, environ: Mapping[str, str]) -> OperatorSettings:
    """Flags win over environment variables (HALFCLOSE_OPERATOR_*), which win over defaults.

    Raises ``UserError`` with one line for a bad value.
    """

    def env(name: str, default: str) -> str:
        return environ.get(f"HALFCLOSE_OPERATOR_{name}", default)

    parser = _Parser(
        prog="halfclose-operator",
        description="The halfclose operator (kopf): policy status and reports.",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=env("METRICS_PORT", "9480"),
        help="port of /metrics and /readyz (default 9480)",
    )
    parser.add_argument(
        "--liveness-port",
        type=_port,
        default=env("LIVENESS_PORT", "8080"),
        help="port of kopf's /healthz (default 8080; 0 disables)",
    )
    parser.add_argument(
        "--debounce-seconds",
        type=_seconds,
        default=env("DEBOUNCE_SECONDS", "2"),
        help="at most one status write per policy per this many seconds",
    )
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default=env("LOG_LEVEL", "INFO")
    )
    parser.add_argument(
        "--peering",
        default=env("PEERING", "halfclose"),
        help="ClusterKopfPeering object for leader election (default halfclose)",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=env("STANDALONE", "") in ("1", "true", "yes"),
        help="no leader election: run exactly one replica",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=env("PRIORITY", "0") or "0",
        help="replica priority (default: random per process)",
    )
    parser.add_argument(
        "--metrics-auth",
        action="store_true",
        default=env("METRICS_AUTH", "") in ("1", "true", "yes"),
        help="serve /metrics only to bearer tokens allowed to get /metrics (TokenReview + "
        "SubjectAccessReview)",
    )
    parser.add_argument(
        "--metrics-auth-cache-seconds",
        type=_cache_seconds,
        default=env("METRICS_AUTH_CACHE_SECONDS", "60"),
        help="how long a token's review is cached (default 60)",
    )
    parser.add_argument(
        "--kubeconfig",
        default=environ.get("KUBECONFIG") or None,
        help="kubeconfig file (default: $KUBECONFIG, else in-cluster)",
    )
    args = parser.parse_args(argv)
    priority = args.priority or random.SystemRandom().randint(1, 2**31 - 1)
    return OperatorSettings(
        metrics_port=args.metrics_port,
        liveness_port=args.liveness_port or None,
        debounce_seconds=args.debounce_seconds,
        log_level=args.log_level,
        peering=None if args.standalone else args.peering,
        priority=priority,
        kubeconfig=args.kubeconfig,
        metrics_auth=args.metrics_auth,
        metrics_auth_cache_seconds=args.metrics_auth_cache_seconds,
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def environment() -> Mapping[str, str]:
    """The process environment; read here, at the entry point only."""
    return os.environ
