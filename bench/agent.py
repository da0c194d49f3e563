"""Agent benchmark (``make bench-agent``, root): leak lifetime and footprint.

1. Leak lifetime: >= 100 leaks form on their own in lab pods (the upstream
   half-closes, the app closes only after the NAT entry expired) while the
   agent runs a KillSockets policy.  Lifetime = socket destroyed - NAT entry
   expiry, as the agent measures it (entry timer from ctnetlink, or the
   DESTROY event).  Compared with the status quo: Envoy's tcp_proxy idle
   timeout (3600 s) is what ends such a leak today.
2. Footprint: the agent (a separate process, so its CPU and RSS are its own)
   watching 50 lab netns at a 10 s interval for ~60 s.

The Kubernetes side is the in-memory ``halfclose.agent.kube.fake`` (the
agent loop is the production one); lab proxies are made to look like
containerd containers through cgroup2 scopes, so pod -> netns resolution runs
for real through /proc.  The last line reads ``leak-lifetime-p99-seconds: <v>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support.podcgroup: the cgroup2 container fake

from prometheus_client import CollectorRegistry  # noqa: E402

from halfclose.agent.daemon.loop import Agent  # noqa: E402
from halfclose.agent.daemon.metrics import AgentMetrics  # noqa: E402
from halfclose.agent.daemon.remediate import EngineRemediator  # noqa: E402
from halfclose.agent.daemon.settings import AgentSettings  # noqa: E402
from halfclose.agent.kube.fake import FakeReports, FakeWorld  # noqa: E402
from halfclose.lab import Lab, LabSettings  # noqa: E402
from support.podcgroup import FakeContainers, can_fake_containers, cgroup2_mount, pod_object  # noqa: E402

NODE = "bench-node"
ENVOY_IDLE_TIMEOUT = 3600.0
CLOSE_WAIT = 2


def kill_policy(interval: int) -> dict[str, Any]:
    return {
        "apiVersion": "halfclose.io/v1alpha1",
        "kind": "HalfClosePolicy",
        "metadata": {"name": "bench", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "namespaces": ["bench"],
            "action": "KillSockets",
            "thresholds": {"minIdleSeconds": 0, "maxKillsPerMinute": 100000},
            "scanIntervalSeconds": interval,
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def world_for(lab: Lab, containers: FakeContainers, pods: int) -> FakeWorld:
    world = FakeWorld()
    world.put_namespace("bench")
    for i in range(pods):
        cid = containers.adopt(lab.proxy_pid(i))
        world.put_pod(pod_object("bench", f"pod{i}", NODE, cid))
    return world


@contextlib.contextmanager
def lab_with_containers(tag: str, pods: int) -> Iterator[tuple[Lab, FakeContainers]]:
    """A lab of ``pods`` pods whose proxies can be adopted as containers; torn down on exit."""
    prefix = f"hct-{secrets.token_hex(2)}-{tag}"
    lab = Lab(LabSettings(prefix=prefix, pods=pods, close_wait_timeout=CLOSE_WAIT))
    mount = cgroup2_mount()
    assert mount is not None
    containers = FakeContainers(mount)
    lab.up()
    try:
        yield lab, containers
    finally:
        containers.close()
        lab.down()


class SilenceClock(EngineRemediator):
    """Each killed socket's lifetime by the kernel's own clock: its silence as
    read just before the kill (tcp_info: the last packet either way) less the
    CLOSE_WAIT timeout (the entry expired that long after the last packet).

    Independent of when the agent drained the event it predicted the expiry
    from, which is what the agent's own measure (``Agent.lifetimes``) rests on.
    """

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self.lifetimes: list[float] = []

    def execute(self, scanner: Any, plan: Any, *args: Any, **kwargs: Any) -> Any:
        report = super().execute(scanner, plan, *args, **kwargs)
        for o in report.outcomes:
            silence = o.finding.socket.silence_seconds
            if o.outcome.value == "killed" and silence is not None:
                self.lifetimes.append(max(0.0, silence - CLOSE_WAIT))
        return report


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds (user + system, the kernel's dump walks included) the thread used."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


@contextlib.contextmanager
def running_agent(world: FakeWorld, state_dir: str) -> Iterator[Agent]:
    """The production agent loop on a thread over ``world`` with the bench KillSockets
    policy; stopped and joined on exit.  ``agent.silence_clock`` is the remediator
    (``SilenceClock``)."""
    remediator = SilenceClock(state_dir)
    agent = Agent(
        AgentSettings(node_name=NODE, state_dir=state_dir),
        AgentMetrics(CollectorRegistry(), NODE),
        world,
        FakeReports(),
        remediator,
    )
    agent.silence_clock = remediator  # type: ignore[attr-defined]
    world.on_change = agent.notify
    world.put_policy(kill_policy(interval=10))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    agent.loop_thread = thread  # type: ignore[attr-defined]
    try:
        yield agent
    finally:
        agent.stop()
        thread.join(10)


def wait_watching(agent: Agent, pods: int, timeout: float, poll: float = 0.05) -> None:
    """Until the agent watches ``pods`` netns (or ``timeout`` seconds passed)."""
    deadline = time.monotonic() + timeout
    while len(agent.netns) < pods and time.monotonic() < deadline:
        time.sleep(poll)


def wait_lifetimes(agent: Agent, want: int) -> None:
    """Until the agent measured ``want`` leak lifetimes (or the leaks had time to form and go)."""
    deadline = time.monotonic() + CLOSE_WAIT + 30
    while len(agent.lifetimes) < want and time.monotonic() < deadline:
        time.sleep(0.1)


def leak_lifetime(leaks: int, pods: int, state_dir: str) -> list[float]:
    with lab_with_containers("ba", pods) as (lab, containers):
        with running_agent(world_for(lab, containers, pods), state_dir) as agent:
            wait_watching(agent, pods, timeout=30)
            per_pod = -(-leaks // pods)
            rounds = 4
            per_round = -(-per_pod // rounds)
            for r in range(rounds):
                # Several small batches spread in time, in every pod.
                for i in range(pods):
                    lab.late_close(count=per_round, after_seconds=CLOSE_WAIT + 5, pod=i)
                print(
                    f"  round {r + 1}/{rounds}: {per_round * pods} connections half-closed",
                    file=sys.stderr,
                )
                time.sleep(0.5)
            wait_lifetimes(agent, per_round * rounds * pods)
        return list(agent.lifetimes)


def host_tcp_sockets() -> str:
    """TCP sockets of every netns on the host (the slab's active objects), or '?'."""
    try:
        with open("/proc/slabinfo", encoding="ascii") as f:
            slabs = [line.split() for line in f if line.startswith(("TCP ", "TCPv6 "))]
        return str(sum(int(slab[1]) for slab in slabs))
    except (OSError, ValueError, IndexError):
        return "?"


def footprint(pods: int, seconds: float, state_dir: str) -> dict[str, float]:
    t0 = time.monotonic()
    with lab_with_containers("bf", pods) as (lab, containers):
        print(f"  lab with {pods} pods up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        ids = [containers.adopt(lab.proxy_pid(i)) for i in range(pods)]
        for i in range(pods):
            lab.idle(2, pod=i)  # something to look at: established connections
        config = {"pods": ids, "seconds": seconds, "state_dir": state_dir}
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.agent", "--child", json.dumps(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            out, _ = child.communicate(timeout=seconds + 60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        return dict(json.loads(out.strip().splitlines()[-1]))


def children_cpu() -> float:
    """CPU seconds of this process's ended (waited-for) children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child(config: dict[str, Any]) -> None:
    """The agent alone in a process: measure what it costs to watch the pods."""
    world = FakeWorld()
    world.put_namespace("bench")
    for i, cid in enumerate(config["pods"]):
        world.put_pod(pod_object("bench", f"pod{i}", NODE, cid))
    with running_agent(world, config["state_dir"]) as agent:
        # Warm-up: every netns opened and scanned once (its rules read: under
        # load the first scans of 110 netns take many seconds).
        wait_watching(agent, len(config["pods"]), timeout=30, poll=0.1)
        deadline = time.monotonic() + 60
        while agent.scans < len(config["pods"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        start_cpu, start_wall, start_scans = time.process_time(), time.monotonic(), agent.scans
        start_children = children_cpu()
        time.sleep(config["seconds"])
        cpu, wall = time.process_time() - start_cpu, time.monotonic() - start_wall
        # The rule tools (nsenter + iptables-save/nft) the agent starts: not in
        # process_time, but the node pays for them all the same.
        tools = children_cpu() - start_children
        scans = agent.scans - start_scans
        rss_kib = 0
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss_kib = int(line.split()[1])
        watched = len(agent.netns)
    print(
        json.dumps(
            {
                "cpu_percent": 100 * cpu / wall,
                "children_cpu_percent": 100 * tools / wall,
                "rss_mib": rss_kib / 1024,
                "watched": watched,
                "scans": scans,
                "seconds": wall,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.agent")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--leaks", type=int, default=100)
    parser.add_argument("--leak-pods", type=int, default=4)
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    reason = can_fake_containers()
    if reason:
        print(f"bench.agent: {reason}", file=sys.stderr)
        return 2
    state_dir = f"/run/halfclose/bench-{os.getpid()}"
    print(
        f"leak lifetime: {args.leaks} leaks in {args.leak_pods} lab pods, "
        f"close_wait {CLOSE_WAIT}s, KillSockets, scan interval 10 s",
        file=sys.stderr,
    )
    lifetimes = leak_lifetime(args.leaks, args.leak_pods, state_dir)
    p50, p99 = percentile(lifetimes, 0.5), percentile(lifetimes, 0.99)
    print(f"footprint: {args.pods} lab netns, 10 s interval, {args.seconds:.0f} s", file=sys.stderr)
    fp = footprint(args.pods, args.seconds, state_dir)
    print(f"leaks killed:                {len(lifetimes)}")
    print(f"leak lifetime p50:           {p50:.3f} s")
    print(
        f"leak lifetime p99:           {p99:.3f} s (max {max(lifetimes, default=0):.3f} s,"
        f" mean {statistics.fmean(lifetimes) if lifetimes else 0:.3f} s)"
    )
    print(
        f"status quo (Envoy idle):     {ENVOY_IDLE_TIMEOUT:.0f} s -> p99 ratio "
        f"{p99 / ENVOY_IDLE_TIMEOUT:.6f} ({ENVOY_IDLE_TIMEOUT / p99:,.0f}x shorter)"
    )
    print(
        f"footprint ({fp['watched']:.0f} netns watched, {fp['scans']:.0f} scans in "
        f"{fp['seconds']:.0f} s): CPU {fp['cpu_percent']:.2f}% of one core "
        f"(+ {fp.get('children_cpu_percent', 0.0):.2f}% in the rule tools it starts), "
        f"RSS {fp['rss_mib']:.1f} MiB; host TCP sockets {host_tcp_sockets()} "
        "(each scan's dump walks them all unless the netns has its own hash: docs/install.md)"
    )
    print(f"leak-lifetime-p99-seconds: {p99:.3f}")
    return 0 if len(lifetimes) >= args.leaks else 1


if __name__ == "__main__":
    sys.exit(main())
