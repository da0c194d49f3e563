"""make e2e-node: the chart on a real one-node cluster, a meshed pod leaking,
the agent finding and killing the leaks end to end.

Builds (cached) the control plane, kubelet and scheduler, the images, starts
the node (cluster.py), installs charts/halfclose, runs the scenario and prints
a transcript of the key kubectl outputs. Exit status 0 only if every check
passed; the node is torn down either way. Root only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Node, log, sh, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "halfclose"
CACHE = Path(os.environ.get("HALFCLOSE_CACHE") or Path.home() / ".cache" / "halfclose") / "node"
RELEASE = "halfclose"
SYSTEM_NS = "halfclose-system"
NS = "shop"
LEAKS = 5
CLOSE_WAIT = 5  # the app pod netns's nf_conntrack_tcp_timeout_close_wait (pod sysctl)
PATCHED = 600  # what the PatchConntrack policy sets it to

TRANSCRIPT: list[str] = []
TIMES: dict[str, float] = {}


def say(title: str, text: str = "") -> None:
    block = f"\n$ {title}\n{text.rstrip()}" if text else f"\n# {title}"
    TRANSCRIPT.append(block)
    print(block, flush=True)


@contextmanager
def phase(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    log(f"--- {name}")
    try:
        yield
    finally:
        TIMES[name] = time.monotonic() - t0


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)
    say(f"ok: {msg}")


# --------------------------------------------------------------------------- builds


def build() -> tuple[Path, Path, dict[str, Path]]:
    kube_bin = Path(sh(["bash", str(REPO / "hack/kube-assets.sh")], timeout=3600).strip())
    node_bin = Path(sh(["bash", str(REPO / "hack/node/build-kube.sh")], timeout=3600).strip())
    sh(["bash", str(REPO / "hack/mesh-generators.sh")], timeout=3600)
    out = sh([sys.executable, str(REPO / "hack/node/images.py")], timeout=3600)
    images = {}
    for line in out.splitlines():
        ref, _, path = line.partition("=")
        images[ref] = Path(path)
    return kube_bin, node_bin, images


# --------------------------------------------------------------------------- chart


EXTRA_VALUES: dict[str, Any] = {}
PROGRAM_IMAGES: dict[str, str] = {}  # "agent"/"operator" -> image ref, when per-program


def merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def chart_values(work: Path, **agent: Any) -> dict[str, Any]:
    # The agent's state hostPath: a private folder, not the host's /run/halfclose.
    values: dict[str, Any] = {"agent": {"stateHostPath": str(work / "agent-state"), **agent}}
    if PROGRAM_IMAGES:  # the Dockerfile's agent/operator targets, the chart's <program>.image
        for program, ref in PROGRAM_IMAGES.items():
            repo, tag = ref.rsplit(":", 1)
            values.setdefault(program, {})["image"] = {"repository": repo, "tag": tag}
    else:
        values["image"] = {"repository": "hcn.local/halfclose", "tag": "e2e"}
    return merged(values, EXTRA_VALUES)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """`helm template` through Helm's own SDK (helm-python-sdk): the SDK has
    no offline install, so the install is this render + kubectl apply."""
    import helm_python  # noqa: PLC0415 - the dev extras' SDK, imported when rendering

    with tempfile.TemporaryDirectory(prefix="hcn-chart-") as tmp:
        chart_dir = CHART
        if os.environ.get("E2E_NODE_SOURCE") == "HEAD":  # the committed chart, as the images
            tar = subprocess.run(
                ["git", "-C", str(REPO), "archive", "--format=tar", "HEAD", "charts/halfclose"],
                check=True,
                capture_output=True,
                timeout=60,
            ).stdout
            with tarfile.open(fileobj=io.BytesIO(tar)) as t:
                t.extractall(tmp, filter="tar")
            chart_dir = Path(tmp) / "charts" / "halfclose"
        with helm_python.Chart.load(str(chart_dir)) as chart:
            files = chart.render(values, name=RELEASE, namespace=SYSTEM_NS, is_install=True)
    docs = []
    for template, text in sorted(files.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and "test" not in doc["metadata"].get("annotations", {}).get("helm.sh/hook", ""):
                docs.append(doc)
    return docs


def install(n: Node, values: dict[str, Any], what: str) -> dict[str, str]:
    docs = render(values)
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    n.kubectl("create", "namespace", SYSTEM_NS, check=False)
    if crds:
        n.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(crds)
        )
        n.kubectl(
            "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", timeout=70
        )
    out = n.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-n",
        SYSTEM_NS,
        "-f",
        "-",
        input=yaml.safe_dump_all(rest),
    )
    say(f"{what}: kubectl apply --server-side (the chart rendered by the Helm SDK)", out)
    names = {
        d["kind"]: d["metadata"]["name"] for d in rest if d["kind"] in ("Deployment", "DaemonSet")
    }
    for kind, name in names.items():
        n.kubectl(
            "rollout",
            "status",
            f"{kind.lower()}/{name}",
            "-n",
            SYSTEM_NS,
            "--timeout=180s",
            timeout=200,
        )
    return names


# --------------------------------------------------------------------------- workload


def workload(upstream_ip: str | None) -> list[dict[str, Any]]:
    image = "hcn.local/mesh:e2e"
    if upstream_ip is None:
        return [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": NS, "labels": {"istio-injection": "enabled"}},
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "upstream", "namespace": NS},
                "spec": {
                    "containers": [
                        {
                            "name": "upstream",
                            "image": image,
                            "command": ["python3", "/workload/upstream.py"],
                            "ports": [{"containerPort": 8080}],
                        }
                    ]
                },
            },
        ]
    env = [{"name": "UPSTREAM", "value": f"{upstream_ip}:8080"}]
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "app",
                "namespace": NS,
                "labels": {"app": "shop", "security.istio.io/tlsMode": "istio"},
            },
            "spec": {
                "securityContext": {
                    "sysctls": [
                        {
                            "name": "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
                            "value": str(CLOSE_WAIT),
                        }
                    ]
                },
                # Istio's own rule generator, as istio-init runs it: outbound TCP
                # REDIRECTed to the sidecar's 15001, the proxy's uid 1337 exempt.
                "initContainers": [
                    {
                        "name": "istio-init",
                        "image": image,
                        "command": [
                            "istio-iptables",
                            "-p",
                            "15001",
                            "-z",
                            "15006",
                            "-u",
                            "1337",
                            "-m",
                            "REDIRECT",
                            "-i",
                            "*",
                            "-x",
                            "",
                            "-b",
                            "",
                            "-d",
                            "15090,15021,15020",
                        ],
                        "securityContext": {
                            "runAsUser": 0,
                            "runAsNonRoot": False,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
                        },
                    }
                ],
                "containers": [
                    {
                        "name": "istio-proxy",
                        "image": image,
                        "env": env,
                        "command": ["haproxy", "-db", "-f", "/workload/haproxy.cfg"],
                        "securityContext": {"runAsUser": 1337, "runAsGroup": 1337},
                    },
                    {
                        "name": "app",
                        "image": image,
                        "env": [*env, {"name": "HOLD", "value": str(CLOSE_WAIT + 7)}],
                        "command": ["python3", "/workload/app.py"],
                    },
                ],
            },
        },
    ]


def policy(name: str, action: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "halfclose.io/v1alpha1",
        "kind": "HalfClosePolicy",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"istio-injection": "enabled"}},
            "podSelector": {
                "matchExpressions": [{"key": "security.istio.io/tlsMode", "operator": "Exists"}]
            },
            "capturePorts": [15001],
            "action": action,
            "scanIntervalSeconds": 5,
            **spec,
        },
    }


def apply(n: Node, objs: list[dict[str, Any]]) -> str:
    return n.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))


# --------------------------------------------------------------------------- observations


def report_of(n: Node, pod: str) -> dict[str, Any] | None:
    for r in n.get("hcr", "-n", NS)["items"]:
        if r["spec"].get("podName") == pod:
            return r  # type: ignore[no-any-return]
    return None


def status(n: Node, pod: str, field: str) -> int:
    r = report_of(n, pod)
    return int((r or {}).get("status", {}).get(field) or 0)


def in_app(n: Node, *argv: str) -> str:
    """Run ARGV in the app container (so inside the meshed pod's netns)."""
    return n.kubectl("exec", "-n", NS, "app", "-c", "app", "--", *argv)


def ss(n: Node, state: str) -> list[str]:
    """Sockets in STATE on the sidecar's port, from `ss` run inside the app pod's netns."""
    out = in_app(n, "ss", "-tanH", "state", state, "( sport = :15001 )")
    return [line for line in out.splitlines() if line.strip()]


def sysctl(n: Node) -> int:
    return int(in_app(n, "cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait"))


def metrics(n: Node, component: str) -> str:
    pods = n.get("pods", "-n", SYSTEM_NS, "-l", f"app.kubernetes.io/component={component}")["items"]
    ip = pods[0]["status"]["podIP"]
    port = 9479
    for c in pods[0]["spec"]["containers"]:
        for p in c.get("ports", []):
            if p.get("name") == "metrics":
                port = p["containerPort"]
    code = (
        "import sys, urllib.request as u;print(u.urlopen(sys.argv[1], timeout=10).read().decode())"
    )
    return n.run("python3", "-c", code, f"http://{ip}:{port}/metrics")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- scenario


def scenario(n: Node, work: Path) -> None:
    with phase("install"):
        names = install(
            n,
            chart_values(work),
            f"helm install halfclose (image; values {EXTRA_VALUES or 'default'})",
        )
        say(
            "kubectl get pods -n halfclose-system -o wide",
            n.kubectl("get", "pods", "-n", SYSTEM_NS, "-o", "wide"),
        )
        ds = n.get("daemonset", names["DaemonSet"], "-n", SYSTEM_NS)
        pod_spec = ds["spec"]["template"]["spec"]
        say(
            "the agent's securityContext as the chart renders it and the API stored it",
            json.dumps(
                {
                    "hostPID": pod_spec.get("hostPID", False),
                    "pod": pod_spec.get("securityContext"),
                    "agent": pod_spec["containers"][0].get("securityContext"),
                    "volumes": [v["name"] for v in pod_spec["volumes"]],
                },
                indent=1,
            ),
        )

    with phase("workload"):
        apply(n, workload(None))
        n.kubectl(
            "wait", "-n", NS, "--for=condition=Ready", "pod/upstream", "--timeout=90s", timeout=100
        )
        upstream_ip = n.get("pod", "-n", NS, "upstream")["status"]["podIP"]
        apply(n, [policy("e2e-report", "Report", thresholds={"minIdleSeconds": CLOSE_WAIT})])
        apply(n, workload(upstream_ip))
        n.kubectl(
            "wait", "-n", NS, "--for=condition=Ready", "pod/app", "--timeout=90s", timeout=100
        )
        say("kubectl get pods -n shop -o wide", n.kubectl("get", "pods", "-n", NS, "-o", "wide"))
        app_ip = n.get("pod", "-n", NS, "app")["status"]["podIP"]
        netns = n.pod_netns(app_ip)
        rules = n.run("nsenter", f"--net={netns}", "iptables-save", "-t", "nat")
        say(f"nsenter --net={netns} iptables-save -t nat   # istio-init's rules", rules)

    with phase("report"):
        try:
            wait_for(lambda: status(n, "app", "leaked") >= LEAKS, 90, f"{LEAKS} leaks reported")
        except TimeoutError:
            say("kubectl get hcr -A", n.kubectl("get", "hcr", "-A", check=False))
            say(
                "kubectl exec app -- ss -tan",
                n.kubectl("exec", "-n", NS, "app", "-c", "app", "--", "ss", "-tan", check=False),
            )
            seen = [
                ln
                for ln in metrics(n, "agent").splitlines()
                if ln.startswith(("halfclose_watched_netns", "halfclose_scan_errors_total"))
            ]
            say("the agent's /metrics (watched netns, scan errors)", "\n".join(seen))
            raise
        say("kubectl get hcr -A", n.kubectl("get", "hcr", "-A"))
        fw2 = ss(n, "fin-wait-2")
        say("kubectl exec app -- ss -tan state fin-wait-2 '( sport = :15001 )'", "\n".join(fw2))
        check(len(fw2) == LEAKS, f"{LEAKS} leaked FIN_WAIT2 sidecar sockets in the pod's netns")
        time.sleep(12)  # two more scans of the Report policy
        check(
            len(ss(n, "fin-wait-2")) == LEAKS,
            "Report policy: after two more scans every leak is still there",
        )
        check(status(n, "app", "killedTotal") == 0, "Report policy: killedTotal 0")

    with phase("kill"):
        n.kubectl("delete", "halfclosepolicy", "e2e-report")
        apply(n, [policy("e2e-kill", "KillSockets", thresholds={"minIdleSeconds": CLOSE_WAIT})])
        say("kubectl get halfclosepolicy", n.kubectl("get", "halfclosepolicy"))
        wait_for(
            lambda: status(n, "app", "killedTotal") >= LEAKS, 90, "the kills in the app's report"
        )
        say("kubectl get hcr -A", n.kubectl("get", "hcr", "-A"))
        fw2 = ss(n, "fin-wait-2")
        say(
            "kubectl exec app -- ss -tan state fin-wait-2 '( sport = :15001 )'",
            "\n".join(fw2) or "(none)",
        )
        check(not fw2, "KillSockets: no FIN_WAIT2 sidecar socket left in the pod's netns")
        cw = n.kubectl(
            "exec", "-n", NS, "app", "-c", "app", "--", "ss", "-tanH", "state", "close-wait"
        )
        say("kubectl exec app -- ss -tan state close-wait", cw or "(none)")
        check(not cw.strip(), "the sidecar closed the paired upstream sockets (no CLOSE_WAIT left)")
        desc = n.kubectl("describe", "pod", "-n", NS, "app")
        events = desc[desc.find("Events:") :]
        say("kubectl describe pod -n shop app (Events)", events)
        check("LeakedSocketsKilled" in events, "the pod's Events show LeakedSocketsKilled")
        text = metrics(n, "agent")
        lines = [
            ln
            for ln in text.splitlines()
            if ln.startswith(("halfclose_sockets_killed_total", "halfclose_leaked_sockets"))
        ]
        say("curl http://<agent pod>:9479/metrics | grep killed/leaked", "\n".join(lines))
        killed = metric(text, "halfclose_sockets_killed_total", namespace=NS, pod="app")
        check(
            killed >= LEAKS,
            f"agent /metrics: halfclose_sockets_killed_total{{pod=app}} = {killed:g}",
        )

    with phase("patch-conntrack"):
        install(
            n,
            chart_values(work, sysctlPatching={"enabled": True}),
            "helm upgrade --set agent.sysctlPatching.enabled=true",
        )
        n.kubectl("delete", "halfclosepolicy", "e2e-kill")
        before = sysctl(n)
        check(
            before == CLOSE_WAIT,
            f"the app pod's close_wait sysctl is {before} (its own securityContext)",
        )
        apply(
            n,
            [
                policy(
                    "e2e-patch",
                    "PatchConntrack",
                    conntrack={"strategy": "Sysctl", "closeWaitTimeoutSeconds": PATCHED},
                )
            ],
        )
        wait_for(lambda: sysctl(n) == PATCHED, 60, f"close_wait patched to {PATCHED}")
        say(
            "kubectl exec app -- cat /proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            str(PATCHED),
        )
        n.kubectl("delete", "halfclosepolicy", "e2e-patch")
        wait_for(lambda: sysctl(n) == CLOSE_WAIT, 60, f"close_wait restored to {CLOSE_WAIT}")
        check(
            True,
            f"PatchConntrack: sysctl {CLOSE_WAIT} -> {PATCHED}, {CLOSE_WAIT} again once deleted",
        )

    with phase("gc"):
        # A report exists while a policy has something to say about the pod:
        # new leaks under a Report policy, formed on demand in the app container.
        apply(n, [policy("e2e-report", "Report", thresholds={"minIdleSeconds": CLOSE_WAIT})])
        n.kubectl(
            "exec",
            "-n",
            NS,
            "app",
            "-c",
            "app",
            "--",
            "python3",
            "/workload/app.py",
            "leak",
            "2",
            str(CLOSE_WAIT + 7),
            timeout=60,
        )
        wait_for(lambda: status(n, "app", "leaked") >= 2, 90, "2 new leaks in the app's report")
        say("kubectl get hcr -A", n.kubectl("get", "hcr", "-A"))
        n.kubectl("delete", "pod", "-n", NS, "app", "--wait=true", "--timeout=60s", timeout=70)
        wait_for(lambda: report_of(n, "app") is None, 60, "the app's report garbage-collected")
        say(
            "kubectl get hcr -A (after kubectl delete pod app)",
            n.kubectl("get", "hcr", "-A") or "No resources found",
        )
        check(True, "deleting the pod garbage-collected its report")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--set-json",
        metavar="JSON",
        default=os.environ.get("E2E_NODE_VALUES", ""),
        help='extra chart values (JSON), e.g. \'{"agent": {"hostPID": true}}\'',
    )
    args = parser.parse_args()
    if args.set_json:
        EXTRA_VALUES.update(json.loads(args.set_json))
    if os.geteuid() != 0:
        print(
            "e2e-node: needs root (network and mount namespaces, containerd, kubelet)",
            file=sys.stderr,
        )
        return 2
    # SIGTERM (a CI timeout) tears the node down like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    t0 = time.monotonic()
    with phase("build"):
        kube_bin, node_bin, images = build()
    for ref in images:
        for program in ("agent", "operator"):
            if ref.startswith(f"hcn.local/halfclose-{program}:"):
                PROGRAM_IMAGES[program] = ref
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hcn-", dir="/tmp"))
    node = Node(work, kube_bin, node_bin)
    ok = False
    try:
        with phase("node up"):
            node.start(images)
        say("kubectl get nodes -o wide", node.kubectl("get", "nodes", "-o", "wide"))
        scenario(node, work)
        ok = True
    except Exception:
        traceback.print_exc()
        for name in ("kubelet", "containerd"):
            print(f"--- {name} (last lines)\n{node.tail(name, 30)}")
        if node.holder is not None:
            for ns in (SYSTEM_NS, NS):
                print(
                    node.kubectl(
                        "get", "pods,events", "-n", ns, "-o", "wide", check=False, timeout=20
                    )
                )
            agent_logs = node.kubectl(
                "logs",
                "-n",
                SYSTEM_NS,
                "-l",
                "app.kubernetes.io/component=agent",
                "--tail=40",
                check=False,
                timeout=20,
            )
            print(f"--- agent logs\n{agent_logs}")
    finally:
        with phase("teardown"):
            node.teardown()
        if not args.keep_logs:
            sh(["rm", "-rf", str(work)], check=False)
    TIMES["total"] = time.monotonic() - t0
    summary = ", ".join(f"{k} {v:.0f}s" for k, v in TIMES.items())
    say(f"{'PASSED' if ok else 'FAILED'}: {summary}")
    (CACHE / "last-transcript.txt").write_text("\n".join(TRANSCRIPT) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
