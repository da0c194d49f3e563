"""A real Prometheus server (Debian's ``prometheus`` package) for tests.

It listens on 127.0.0.1 only, keeps its TSDB in a temporary directory, scrapes
and evaluates every second, and is stopped (SIGTERM, then SIGKILL) by
``close()`` whatever happened.  ``reload(config)`` swaps the scrape config
through ``/-/reload`` (the lifecycle API), as a Prometheus operator would.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

INTERVAL = "1s"
_PR_SET_PDEATHSIG = 1
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def die_with_parent() -> None:
    """preexec_fn: if pytest is SIGKILLed (no teardown), the kernel kills the child."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the caller binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Target:
    """One scrape target: a job, its address and the labels a PodMonitor would add."""

    job: str
    address: str
    labels: Mapping[str, str]
    honor_labels: bool = False


def scrape_config(
    targets: Sequence[Target], rule_files: Sequence[str], jobs: Sequence[str] = ()
) -> dict[str, Any]:
    """A config scraping ``targets``; each of ``jobs`` is kept even with no target
    (a monitor whose pods are gone), so its series go stale instead of lingering."""
    by_job: dict[str, list[Target]] = {job: [] for job in jobs}
    for t in targets:
        by_job.setdefault(t.job, []).append(t)
    return {
        "global": {
            "scrape_interval": INTERVAL,
            "scrape_timeout": INTERVAL,
            "evaluation_interval": INTERVAL,
        },
        "rule_files": list(rule_files),
        "scrape_configs": [
            {
                "job_name": job,
                "honor_labels": any(t.honor_labels for t in group),
                "static_configs": [
                    {"targets": [t.address], "labels": dict(t.labels)} for t in group
                ]
                or [{"targets": []}],
            }
            for job, group in by_job.items()
        ],
    }


class PrometheusError(AssertionError):
    pass


class PrometheusServer:
    def __init__(self, workdir: Path, binary: str) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, config: Mapping[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
        (self.workdir / "tsdb").mkdir(exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    "--storage.tsdb.retention.time=1d",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only sets PDEATHSIG
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready in {START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.1)

    def reload(self, config: Mapping[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise PrometheusError(f"reload: HTTP {resp.status}")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)

    def log(self, tail: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-tail:]
        return ""

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    # -- the HTTP API ---------------------------------------------------------------

    def api(self, path: str, **params: str | Sequence[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=20) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            doc = json.loads(exc.read() or b"{}")
        if doc.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> Any:
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}"
        )
        return data["result"]

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def evaluated_since(self, t: float) -> bool:
        """Has every rule group been evaluated after wall time ``t``?"""
        groups = self.api("rules")["groups"]
        return bool(groups) and all(rfc3339(g["lastEvaluation"]) > t for g in groups)

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def firing(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts() if a["labels"]["alertname"] == name and
                a["state"] == "firing"]  # fmt: skip

    def wait(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """Poll ``check`` until it is truthy (bounded); the error says what was awaited."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise PrometheusError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.25)


def rfc3339(text: str) -> float:
    """Prometheus's timestamps (nanoseconds, Z) as epoch seconds."""
    m = re.fullmatch(r"(.+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    whole = dt.datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
    return whole.timestamp() + float(f"0.{m.group(2) or 0}")


def has_number(series: Sequence[Mapping[str, Any]]) -> bool:
    """True when some series of a query result holds a value that is a number (not NaN)."""
    for s in series:
        values = s.get("values") or ([s["value"]] if "value" in s else [])
        for _ts, text in values:
            if not math.isnan(float(text)):
                return True
    return False
