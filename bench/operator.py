"""Operator benchmark (``make bench-operator``; not a test): start-up at cluster scale.

Against the real control plane (tests/support/controlplane.py: upstream etcd,
kube-apiserver, kube-controller-manager on 127.0.0.1), with the operator as a
separate process (``halfclose-operator``) running as the chart's operator
ServiceAccount:

- a cluster of N pods over 100 nodes in 20 namespaces (created through the
  API; no kubelet, so they stay Pending with a nodeName), 4 reports per pod
  (20,000 at 5,000 pods; ``--reports-per-pod``) with counters, 3 policies (two that split the
  namespaces, one newer that overlaps both);
- start-up: seconds from starting the operator process until every policy's
  status shows the expected observedGeneration, matched pods and report sums
  (statuses are cleared before each run), with the operator's RSS and CPU
  seconds then and its API writes during start-up (audit log);
- steady state: 20 report updates per second for ``--churn-seconds``; status
  writes per policy per minute.

Each size runs the baseline first -- the operator of ``--baseline`` (a git
commit, default 33bbaae: before issue 10; exported with ``git archive``, run
from this venv) capped at ``--cap`` seconds -- then this tree's operator.  The
last line reads ``operator-startup-seconds-5000-pods: <value>`` (this tree).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support.controlplane: the real control plane

from support.controlplane import (  # noqa: E402
    ControlPlane,
    free_port,
    locate_assets,
    start_control_plane,
)

NAMESPACES = 20
NODES = 100
GROUP_PATH = "/apis/halfclose.io/v1alpha1"
POLICIES = ("istio", "linkerd", "shop")
JSON_TYPE = "application/json"
CHART_SA = "system:serviceaccount:halfclose-system:halfclose-operator"


# ----------------------------------------------------------------------------- API writes


class Pool:
    """Keep-alive HTTPS connections per thread, as the admin (client certificate)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.host, self.port = "127.0.0.1", cp.port
        self.ctx = ssl.create_default_context(cafile=str(cp.certs.ca))
        self.ctx.load_cert_chain(str(cp.certs.crt("admin")), str(cp.certs.key("admin")))
        self.local = threading.local()

    def call(
        self, method: str, path: str, body: Any, content_type: str = "application/json"
    ) -> Any:
        for attempt in range(5):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPSConnection(
                    self.host, self.port, context=self.ctx, timeout=60
                )
            try:
                conn.request(
                    method,
                    path,
                    json.dumps(body),
                    {"Content-Type": content_type, "Accept": "application/json"},
                )
                rsp = conn.getresponse()
                data = rsp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                time.sleep(0.2 * (attempt + 1))
                continue
            if rsp.status == 429 or rsp.status >= 500:
                time.sleep(0.2 * (attempt + 1))
                continue
            if rsp.status >= 400:
                raise RuntimeError(f"{method} {path}: {rsp.status} {data[:300]!r}")
            return json.loads(data)
        raise RuntimeError(f"{method} {path}: gave up")


def parallel(pool_size: int, fn: Any, items: list[Any]) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(pool_size) as ex:
        return list(ex.map(fn, items))


# ----------------------------------------------------------------------------- the cluster


def namespace_of(i: int) -> str:
    return f"bench-{i % NAMESPACES:02d}"


def istio_namespace(ns: str) -> bool:
    return int(ns.rsplit("-", 1)[1]) % 2 == 0


@dataclass
class Cluster:
    reports_per_pod: int = 4
    pods: int = 0
    reports: int = 0
    # Expected status per policy: matchedPods and report sums.
    matched: Counter[str] = field(default_factory=Counter)
    leaked: Counter[str] = field(default_factory=Counter)
    killed: Counter[str] = field(default_factory=Counter)
    report_names: list[tuple[str, str]] = field(default_factory=list)
    churned: int = 0  # report updates so far: each run's churn continues, never repeats values


def create_base(cp: ControlPlane, pool: Pool) -> None:
    for n in range(NAMESPACES):
        ns = f"bench-{n:02d}"
        labels = {"istio-injection": "enabled"} if n % 2 == 0 else {"mesh": "linkerd"}
        cp.ensure_namespace(ns, **labels)
    specs = {
        "istio": {
            "namespaceSelector": {"matchLabels": {"istio-injection": "enabled"}},
            "podSelector": {
                "matchExpressions": [{"key": "security.istio.io/tlsMode", "operator": "Exists"}]
            },
        },
        "linkerd": {"namespaceSelector": {"matchLabels": {"mesh": "linkerd"}}},
        # Newest: overlaps both and loses every pod (AllPodsClaimed).
        "shop": {"namespaces": ["bench-00", "bench-01"]},
    }
    for name in POLICIES:
        pool.call(
            "POST",
            f"{GROUP_PATH}/halfclosepolicies",
            {
                "apiVersion": "halfclose.io/v1alpha1",
                "kind": "HalfClosePolicy",
                "metadata": {"name": name},
                "spec": specs[name],
            },
        )
        time.sleep(1.1)  # creationTimestamp has one-second resolution: a strict order


def grow(cp: ControlPlane, pool: Pool, cluster: Cluster, pods: int, threads: int) -> float:
    """Add pods (and their reports) up to ``pods``; returns seconds taken."""
    started = time.monotonic()

    def make_pod(i: int) -> tuple[int, str]:
        ns, name = namespace_of(i), f"pod-{i:05d}"
        labels = {"app": f"a{i % 5}"}
        labels.update(
            {"security.istio.io/tlsMode": "istio"}
            if istio_namespace(ns)
            else {"linkerd.io/control-plane-ns": "linkerd"}
        )
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "nodeName": f"node-{i % NODES:03d}",
                "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            },
        }
        created = pool.call("POST", f"/api/v1/namespaces/{ns}/pods", body)
        return i, created["metadata"]["uid"]

    new = parallel(threads, make_pod, list(range(cluster.pods, pods)))

    jobs = []
    for i, uid in new:
        ns = namespace_of(i)
        owner = "istio" if istio_namespace(ns) else "linkerd"
        cluster.matched[owner] += 1
        for k in range(cluster.reports_per_pod):
            leaked, killed = (i + k) % 3, k
            cluster.leaked[owner] += leaked
            cluster.killed[owner] += killed
            jobs.append((i, uid, k, owner, leaked, killed))

    def make_report(job: tuple[int, str, int, str, int, int]) -> tuple[str, str]:
        i, uid, k, owner, leaked, killed = job
        ns, pod = namespace_of(i), f"pod-{i:05d}"
        name = f"{pod}-r{k}"
        body = {
            "apiVersion": "halfclose.io/v1alpha1",
            "kind": "HalfCloseReport",
            "metadata": {
                "name": name,
                "namespace": ns,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}],
            },
            "spec": {
                "podName": pod,
                "podUID": uid,
                "nodeName": f"node-{i % NODES:03d}",
                "policy": owner,
            },
        }
        base = f"{GROUP_PATH}/namespaces/{ns}/halfclosereports"
        pool.call("POST", base, body)
        pool.call(
            "PATCH",
            f"{base}/{name}/status",
            {
                "status": {
                    "leaked": leaked,
                    "atRisk": 0,
                    "killedTotal": killed,
                    "lastScanTime": "2026-01-01T00:00:00Z",
                }
            },
            "application/merge-patch+json",
        )
        return ns, name

    cluster.report_names += parallel(threads, make_report, jobs)
    cluster.pods = pods
    cluster.reports = len(cluster.report_names)
    return time.monotonic() - started


def clear_statuses(pool: Pool) -> None:
    for name in POLICIES:
        pool.call(
            "PATCH",
            f"{GROUP_PATH}/halfclosepolicies/{name}/status",
            {"status": None},
            "application/merge-patch+json",
        )


def converged(cp: ControlPlane, cluster: Cluster) -> bool:
    items = cp.request("GET", f"{GROUP_PATH}/halfclosepolicies")["items"]
    by_name = {p["metadata"]["name"]: p for p in items}
    for name in POLICIES:
        p = by_name[name]
        status = p.get("status") or {}
        if status.get("observedGeneration") != p["metadata"]["generation"]:
            return False
        if status.get("matchedPods", 0) != cluster.matched[name]:
            return False
        if status.get("leakedNow", 0) != cluster.leaked[name]:
            return False
        if status.get("killedTotal", 0) != cluster.killed[name]:
            return False
    return True


# ----------------------------------------------------------------------------- the operator


def proc_usage(pid: int) -> tuple[float, float, float]:
    """RSS MiB, peak RSS MiB, CPU seconds (user + system) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    rss = int(status["VmRSS"].split()[0]) / 1024
    hwm = int(status["VmHWM"].split()[0]) / 1024
    return rss, hwm, cpu


@dataclass
class Result:
    variant: str
    pods: int
    reports: int
    startup: float | None  # None: not converged within the cap
    rss: float = 0.0
    peak_rss: float = 0.0
    cpu: float = 0.0
    startup_writes: int = 0
    writes_per_policy_minute: float | None = None
    note: str = ""


def _source_path(tree: Path) -> str:
    """PYTHONPATH for an exported tree: the old single root (src/, before the
    namespace-package split) or the four distribution folders."""
    if (tree / "src").is_dir():
        return str(tree / "src")
    return os.pathsep.join(str(tree / d) for d in ("core", "agent", "operator", "cli"))


def operator_command(variant: str, baseline_src: Path | None) -> tuple[list[str], dict[str, str]]:
    if variant == "baseline":
        assert baseline_src is not None
        code = "import sys; from halfclose.operator.main import main; sys.exit(main())"
        return [sys.executable, "-c", code], {"PYTHONPATH": _source_path(baseline_src)}
    return [str(Path(sys.executable).with_name("halfclose-operator"))], {}


def run_operator(  # noqa: PLR0917 -- one call site, read top to bottom
    cp: ControlPlane,
    pool: Pool,
    cluster: Cluster,
    variant: str,
    baseline_src: Path | None,
    kubeconfig: str,
    cap: float,
    churn_seconds: float,
    run_id: int,
) -> Result:
    clear_statuses(pool)
    time.sleep(1.0)
    command, extra = operator_command(variant, baseline_src)
    env = dict(
        os.environ,
        KUBECONFIG=kubeconfig,
        HALFCLOSE_OPERATOR_METRICS_PORT=str(free_port()),
        HALFCLOSE_OPERATOR_LIVENESS_PORT="0",
        HALFCLOSE_OPERATOR_LOG_LEVEL=os.environ.get("HALFCLOSE_BENCH_LOG_LEVEL", "WARNING"),
        # A fresh peering object per run: a killed run's entry cannot pause the next.
        HALFCLOSE_OPERATOR_PEERING=f"bench-{run_id}",
        **extra,
    )
    log = open(cp.workdir / f"operator-{variant}-{cluster.pods}.log", "w")  # noqa: SIM115
    cp.mark()
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    result = Result(variant, cluster.pods, cluster.reports, None)
    try:
        while time.monotonic() - started < cap:
            if proc.poll() is not None:
                result.note = f"exited {proc.returncode}"
                break
            if converged(cp, cluster):
                result.startup = time.monotonic() - started
                break
            time.sleep(0.1)
        if proc.poll() is None:
            result.rss, result.peak_rss, result.cpu = proc_usage(proc.pid)
        result.startup_writes = sum(
            1 for r in cp.requests if r.user == CHART_SA and r.verb not in ("get", "list", "watch")
        )
        if result.startup is None:
            result.note = result.note or f"not converged within {cap:.0f}s"
        elif churn_seconds > 0:
            result.writes_per_policy_minute = churn(cp, pool, cluster, churn_seconds)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    return result


def churn(cp: ControlPlane, pool: Pool, cluster: Cluster, seconds: float) -> float:
    """About 20 report updates per second (atRisk moves); status writes per policy per minute."""
    cp.mark()
    deadline = time.monotonic() + seconds
    n = cluster.churned
    while time.monotonic() < deadline:
        ns, name = cluster.report_names[(n * 7919) % len(cluster.report_names)]
        pool.call(
            "PATCH",
            f"{GROUP_PATH}/namespaces/{ns}/halfclosereports/{name}/status",
            # atRisk differs from the report's previous value (the same update twice is no news).
            {"status": {"atRisk": n % 7, "lastScanTime": time.strftime("%Y-%m-%dT%H:%M:%SZ")}},
            "application/merge-patch+json",
        )
        n += 1
        time.sleep(max(0.0, 0.05 - 0.001))
    cluster.churned = n
    writes = sum(
        1
        for r in cp.requests
        if r.user == CHART_SA and r.verb == "patch" and r.resource == "halfclosepolicies/status"
    )
    return writes / len(POLICIES) / (seconds / 60)


# ----------------------------------------------------------------------------- main


def export_baseline(commit: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="hct-bench-baseline-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit],  # whichever layout it has
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000", help="pod counts (ascending)")
    parser.add_argument("--baseline", default="33bbaae", help="git commit; 'none' to skip")
    parser.add_argument("--cap", type=float, default=120.0, help="baseline start-up cap (s)")
    parser.add_argument("--churn-seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--reports-per-pod", type=int, default=4, help="4: 20,000 at 5,000 pods")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    assets = locate_assets()
    if isinstance(assets, str):
        print(f"bench-operator: {assets}", file=sys.stderr)
        return 2
    baseline_src = None if args.baseline == "none" else export_baseline(args.baseline)
    cp = start_control_plane(assets)
    results: list[Result] = []
    try:
        pool = Pool(cp)
        kubeconfig = cp.chart_kubeconfig("operator")
        create_base(cp, pool)
        cluster = Cluster(reports_per_pod=args.reports_per_pod)
        run_id = 0
        for size in sizes:
            took = grow(cp, pool, cluster, size, args.threads)
            print(
                f"cluster: {cluster.pods} pods, {cluster.reports} reports ({took:.0f}s to create)",
                flush=True,
            )
            variants = (["baseline"] if baseline_src else []) + ["this tree"]
            for variant in variants:
                run_id += 1
                cap = args.cap if variant == "baseline" else max(args.cap, 120.0)
                r = run_operator(
                    cp, pool, cluster, variant, baseline_src, kubeconfig, cap,
                    args.churn_seconds, run_id,
                )  # fmt: skip
                results.append(r)
                print(describe(r), flush=True)
    finally:
        cp.stop()
        if not os.environ.get("HALFCLOSE_KEEP_KUBE"):
            shutil.rmtree(cp.workdir, ignore_errors=True)
        if baseline_src:
            shutil.rmtree(baseline_src, ignore_errors=True)

    print()
    print(f"{'pods':>6} {'reports':>8} {'variant':<10} {'start-up s':>11} {'RSS MiB':>8}"
          f" {'CPU s':>6} {'writes':>6} {'writes/policy/min':>18}")  # fmt: skip
    for r in results:
        startup = f"{r.startup:.1f}" if r.startup is not None else f">{args.cap:.0f}"
        wpm = f"{r.writes_per_policy_minute:.1f}" if r.writes_per_policy_minute is not None else "-"
        print(
            f"{r.pods:>6} {r.reports:>8} {r.variant:<10} {startup:>11} {r.rss:>8.0f}"
            f" {r.cpu:>6.1f} {r.startup_writes:>6} {wpm:>18}"
        )
    for size in sizes:
        pair = {r.variant: r for r in results if r.pods == size}
        base, new = pair.get("baseline"), pair.get("this tree")
        if base and new and new.startup:
            if base.startup:
                print(f"{size} pods: start-up {base.startup / new.startup:.1f}x faster")
            else:
                print(f"{size} pods: baseline did not converge within {args.cap:.0f}s")
    final = next((r for r in results if r.variant == "this tree" and r.pods == 5000), None)
    value = f"{final.startup:.2f}" if final and final.startup is not None else "none"
    print(f"operator-startup-seconds-5000-pods: {value}")
    return 0


def describe(r: Result) -> str:
    startup = f"{r.startup:.1f}s" if r.startup is not None else "-"
    wpm = (
        f", {r.writes_per_policy_minute:.1f} status writes/policy/min under churn"
        if r.writes_per_policy_minute is not None
        else ""
    )
    return (
        f"  {r.variant}: start-up {startup}, RSS {r.rss:.0f} MiB (peak {r.peak_rss:.0f}),"
        f" CPU {r.cpu:.1f}s, {r.startup_writes} writes{wpm} {r.note}"
    )


if __name__ == "__main__":
    sys.exit(main())
