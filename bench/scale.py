"""Field scale (issue 11): 20,000 leaked pairs in one pod netns, against ``ss`` in the same run.

    make bench            (root; after bench.scan; ~3-4 minutes)
    HALFCLOSE_BENCH_LEAKS=5000 .venv/bin/python -m bench.scale

A scratch netns (``hcb-<hex>-leaks``, removed at exit) holds N leaked pairs
(tests/support/leakfarm.py: N FIN_WAIT2 proxy sockets on :15001, N CLOSE_WAIT
upstream legs, 2N sockets examined).  Every figure is a median of REPEATS runs,
with its spread (min-max), and every ratio is against a baseline measured in
the same run on the same netns, because the machine is shared:

- scan:   ``Scanner.scan()`` in process as ``halfclose scan`` runs it (no owners,
          as the agent) vs ``ss -tin state fin-wait-2 state close-wait``; and
          with owners (``halfclose scan -p``) vs ``ss -tinp``: both walk /proc
- stages: the scan's own stage times (``ScanResult.stages``)
- JSON:   the CLI's compact JSON of the 20k findings (``report.json_chunks``, streamed)
- RSS:    ``halfclose scan --output json`` peak RSS vs ``ss -tin``'s
- kill:   scan + plan + ``engine.kill.kill`` of all N (the collector paused
          throughout, as ``halfclose scan --action kill`` runs them) vs ``ss -K
          state fin-wait-2 '( sport = :15001 )'``, each on a fresh set of N leaks

The last two lines are ``scan-20k-ratio-vs-ss: X`` and ``kill-20k-ratio-vs-ss-K: X``
(medians; below 1.0 means faster than ``ss``).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the leak farm lives with the test support

LEAKS = int(os.environ.get("HALFCLOSE_BENCH_LEAKS", "20000"))
REPEATS = 3
PORT = 15001
SS = ["ss", "-tin", "state", "fin-wait-2", "state", "close-wait"]


def _in_netns(netns: str, argv: list[str]) -> list[str]:
    # nsenter costs one setns(); `ip netns exec` also remounts /sys (several ms).
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


def _timed_run(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB) of one child process, output discarded.

    The peak RSS comes from GNU time (``%M``): a child forked from this big
    process would report our RSS as its own peak (exec keeps the old peak).
    """
    rss_file = f"/tmp/halfclose-bench-rss-{os.getpid()}"
    t = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", rss_file, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    elapsed = time.perf_counter() - t
    try:
        with open(rss_file, encoding="utf-8") as f:
            kib = int(f.read().split()[-1])
    finally:
        os.unlink(rss_file)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"{argv[2:]} exited {proc.returncode}: {err}")
    return elapsed, kib


def _stats(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:8.1f} ms ({min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f})"


def _median_of(fn: Callable[[], float]) -> list[float]:
    return [fn() for _ in range(REPEATS)]


def scan_phase(out: dict[str, object]) -> None:
    from halfclose.agent.core.model import Kind
    from halfclose.agent.engine.scan import Scanner, ScanSettings
    from halfclose.agent.kernel import procfs
    from halfclose.agent.kernel.netns import NetnsHandle
    from support.leakfarm import leaked_pairs

    with (
        leaked_pairs(LEAKS, prefix="hcb") as lk,
        NetnsHandle.from_name(lk.netns) as handle,
        Scanner(handle) as scanner,
    ):
        # The rules are read once and kept (the agent keeps them 60 s); a
        # CLI run reads them each time (~40 ms here, whatever the scale).
        given = ScanSettings(capture_ports=frozenset({PORT}), rules_max_age_seconds=3600)
        agent = dataclasses.replace(given, owners=False)
        first = scanner.scan(given)
        leaked = sum(f.kind is Kind.LEAKED for f in first.findings)
        paired = sum(f.upstream is not None for f in first.findings)
        if leaked != LEAKS or first.sockets_examined != 2 * LEAKS:
            raise RuntimeError(f"fixture: {leaked} leaked, {first.sockets_examined} examined")
        rows: dict[str, list[float]] = {k: [] for k in ("ss", "scan", "ss -p", "scan -p")}
        stages: dict[str, list[float]] = {}
        for _ in range(REPEATS):
            # Interleaved, so load from other processes hits all alike.
            rows["ss"].append(_timed_run(_in_netns(lk.netns, SS))[0])
            # Timed from outside: the call's wall time, including the
            # collection the GC pause defers to the scan's end.
            t = time.perf_counter()
            scanner.scan(agent)
            rows["scan"].append(time.perf_counter() - t)
            rows["ss -p"].append(_timed_run(_in_netns(lk.netns, [*SS[:2], "-p", *SS[2:]]))[0])
            procfs.forget_owners()  # the CLI's case: a fresh process knows no owner
            t = time.perf_counter()
            r = scanner.scan(given)
            rows["scan -p"].append(time.perf_counter() - t)
            for k, v in r.stages.items():
                stages.setdefault(k, []).append(v)
        json_t = _json_times(first)
        rss = _rss(lk.netns)
    out.update(rows=rows, stages=stages, json=json_t, rss=rss, paired=paired)


def _json_times(result: object) -> list[float]:
    """The CLI's compact JSON of the findings, written as the CLI writes it (streamed)."""
    from halfclose.agent.engine.report import json_chunks

    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        for _chunk in json_chunks(result):  # type: ignore[arg-type]
            pass
        times.append(time.perf_counter() - t)
    return times


def _rss(netns: str) -> dict[str, list[float]]:
    cli = str(ROOT / ".venv" / "bin" / "halfclose")
    argv = [cli, "scan", "--netns", netns, "--capture-ports", str(PORT), "--output", "json"]
    out: dict[str, list[float]] = {"ss": [], "cli": [], "cli-seconds": [], "ss-seconds": []}
    for _ in range(REPEATS):
        t, kib = _timed_run(_in_netns(netns, SS))
        out["ss"].append(kib / 1024)
        out["ss-seconds"].append(t)
        try:
            t, kib = _timed_run(argv)
        except RuntimeError as exc:
            print(f"bench.scale: CLI run failed, RSS not measured: {exc}", file=sys.stderr)
            return out
        out["cli"].append(kib / 1024)
        out["cli-seconds"].append(t)
    return out


def kill_phase(out: dict[str, object]) -> None:
    from halfclose.agent.core.model import Outcome
    from halfclose.agent.core.plan import ActionKind, ActionSettings, make_plan
    from halfclose.agent.engine.kill import kill
    from halfclose.agent.engine.nogc import gc_paused
    from halfclose.agent.engine.scan import Scanner, ScanSettings
    from halfclose.agent.kernel.netns import NetnsHandle
    from support.leakfarm import count, leaked_pairs

    times: dict[str, list[float]] = {k: [] for k in ("ss_k", "kill", "scan", "plan", "kill_only")}
    for _ in range(REPEATS):
        with leaked_pairs(LEAKS, prefix="hcb") as lk:
            argv = ["ss", "-K", "state", "fin-wait-2", f"( sport = :{PORT} )"]
            times["ss_k"].append(_timed_run(_in_netns(lk.netns, argv))[0])
            # The proxy's sockets only: an upstream server's socket stays in
            # FIN_WAIT2 until the proxy, told its downstream died, closes its leg.
            left = count(lk.netns, "state", "fin-wait-2", f"( sport = :{PORT} )")
            if left:
                raise RuntimeError(f"ss -K left {left} FIN_WAIT2 sockets on :{PORT}")
        with leaked_pairs(LEAKS, prefix="hcb") as lk, NetnsHandle.from_name(lk.netns) as h:
            # The collector paused for the whole command, as the CLI runs it
            # (cli/scan.py): a pause per step would hand the scan's deferred
            # collection to the plan.
            with Scanner(h) as scanner, gc_paused():
                t = time.perf_counter()
                result = scanner.scan(ScanSettings(capture_ports=frozenset({PORT}), owners=False))
                s = time.perf_counter()
                settings = ActionSettings(
                    action=ActionKind.KILL, min_idle_seconds=0, max_kills=LEAKS
                )
                plan = make_plan(result.findings, result.capture_ports, settings)
                k = time.perf_counter()
                results = kill(scanner.sockdiag, scanner.conntrack, plan.kills, plan.capture_ports)
                done = time.perf_counter()
            killed = sum(r.outcome is Outcome.KILLED for r in results)
            if killed != LEAKS:
                raise RuntimeError(f"killed {killed} of {LEAKS}")
            for name, seconds in (("kill", done - t), ("scan", s - t), ("plan", k - s),
                                  ("kill_only", done - k)):  # fmt: skip
                times[name].append(seconds)
    out.update(times)


def main() -> int:
    if os.geteuid() != 0:
        print("bench.scale: needs root (network namespaces)", file=sys.stderr)
        return 2
    started = time.monotonic()
    load = os.getloadavg()[0]
    print(f"bench.scale: {LEAKS} leaked pairs, {REPEATS} repeats, load {load:.1f}", flush=True)
    res: dict[str, object] = {}
    scan_phase(res)
    kill_phase(res)
    rows: dict[str, list[float]] = res["rows"]  # type: ignore[assignment]
    stages: dict[str, list[float]] = res["stages"]  # type: ignore[assignment]
    rss: dict[str, list[float]] = res["rss"]  # type: ignore[assignment]
    med = statistics.median
    print()
    print(f"scan, {LEAKS} leaks ({2 * LEAKS} sockets), median (min-max) of {REPEATS}:")
    for name, xs in rows.items():
        print(f"  {name:16} {_stats(xs)}")
    print(f"  paired findings: {res['paired']} of {LEAKS}")
    print("  stages of the scan -p (owners looked up):")
    for name, xs in stages.items():
        print(f"    {name:14} {_stats(xs)}")
    json_t: list[float] = res["json"]  # type: ignore[assignment]
    if json_t:
        print(f"  {'json (compact)':16} {_stats(json_t)}")
    if rss["cli"]:
        print(
            f"  RSS: halfclose scan {med(rss['cli']):.1f} MiB, ss {med(rss['ss']):.1f} MiB "
            f"(ratio {med(rss['cli']) / med(rss['ss']):.2f}); CLI wall {_stats(rss['cli-seconds'])}"
        )
    print(f"kill, {LEAKS} leaks, fresh leaks each time:")
    for name in ("ss_k", "kill", "scan", "plan", "kill_only"):
        print(f"  {name:16} {_stats(res[name])}")  # type: ignore[arg-type]
    scan_ratio = med(rows["scan"]) / med(rows["ss"])
    kill_ratio = med(res["kill"]) / med(res["ss_k"])  # type: ignore[arg-type]
    print()
    print(f"scan-processes-20k-ratio-vs-ss-p: {med(rows['scan -p']) / med(rows['ss -p']):.2f}")
    print(f"scan-processes-20k-ratio-vs-ss: {med(rows['scan -p']) / med(rows['ss']):.2f}")
    if rss["cli"]:
        print(f"cli-rss-20k-ratio-vs-ss: {med(rss['cli']) / med(rss['ss']):.2f}")
    print(f"kill-only-20k-ratio-vs-ss-K: {med(res['kill_only']) / med(res['ss_k']):.2f}")  # type: ignore[arg-type]
    print(
        f"bench-seconds: {time.monotonic() - started:.0f} "
        f"(load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end)"
    )
    print(f"scan-20k-ratio-vs-ss: {scan_ratio:.2f}")
    print(f"kill-20k-ratio-vs-ss-K: {kill_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
