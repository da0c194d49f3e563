"""Security properties of the rendered chart: the agent's privileges, the
operator's lack of them, least-privilege RBAC, and the wiring between objects."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from support import chart, rbac

pytestmark = pytest.mark.chart

BASE_CAPS = {"NET_ADMIN", "SYS_ADMIN"}
DAEMONSET_TEMPLATE = chart.CHART / "templates" / "agent" / "daemonset.yaml"


def _pod(manifests: list[chart.Manifest], kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = chart.one(manifests, kind)["spec"]["template"]["spec"]
    return spec


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    assert len(pod["containers"]) == 1
    assert "initContainers" not in pod and "ephemeralContainers" not in pod
    container: dict[str, Any] = pod["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container["env"]}


# --- the agent ----------------------------------------------------------------


def test_agent_privileges_are_exactly_the_documented_ones(
    default_manifests: list[chart.Manifest],
) -> None:
    pod = _pod(default_manifests, "DaemonSet")
    container = _container(pod)
    sc = container["securityContext"]
    assert pod["hostPID"] is False  # opt-in: agent.hostPID
    assert pod.get("hostNetwork", False) is False and not pod.get("hostIPC", False)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0  # capabilities need root: see the template's comment
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(BASE_CAPS)
    assert "SYS_PTRACE" not in sc["capabilities"]["add"]
    # The API server rejects allowPrivilegeEscalation: false with "CAP_SYS_ADMIN".
    assert not any(c.startswith("CAP_") for c in sc["capabilities"]["add"])
    assert "procMount" not in sc and "seLinuxOptions" not in sc


@pytest.mark.parametrize(
    ("values", "extra"),
    [
        ({"netRaw": True}, {"NET_RAW"}),
        ({"dacReadSearch": True}, {"DAC_READ_SEARCH"}),
        ({"netRaw": True, "dacReadSearch": True}, {"NET_RAW", "DAC_READ_SEARCH"}),
    ],
)
def test_agent_optional_capabilities_add_only_themselves(
    values: dict[str, bool], extra: set[str]
) -> None:
    pod = _pod(chart.render({"agent": {"capabilities": values}}), "DaemonSet")
    caps = _container(pod)["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert sorted(caps["add"]) == sorted(BASE_CAPS | extra)


def _host_paths(pod: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    """volume name -> (host path, mount path, read-only) for every hostPath volume."""
    mounts = {m["name"]: m for m in _container(pod)["volumeMounts"]}
    out: dict[str, tuple[str, str, bool]] = {}
    for volume in pod["volumes"]:
        if "hostPath" in volume:
            mount = mounts[volume["name"]]
            out[volume["name"]] = (
                volume["hostPath"]["path"],
                mount["mountPath"],
                bool(mount.get("readOnly", False)),
            )
    return out


def _mount_of(pod: dict[str, Any], name: str) -> dict[str, Any]:
    mount: dict[str, Any] = next(m for m in _container(pod)["volumeMounts"] if m["name"] == name)
    return mount


def test_agent_host_mounts(default_manifests: list[chart.Manifest]) -> None:
    """Default: the runtime's netns bind mounts read-only, no host /proc, no writable sysctl."""
    pod = _pod(default_manifests, "DaemonSet")
    env = _env(_container(pod))
    assert "HOST_PROC" not in env and "SYSCTL_PROC" not in env
    assert env["NETNS_DIR"]["value"] == "/host/run/netns"
    assert sorted(_host_paths(pod).values()) == [
        ("/run/halfclose", "/run/halfclose", False),  # restore records; tmpfs on the host
        ("/var/run/netns", "/host/run/netns", True),  # containerd's and CRI-O's netns mounts
    ]
    # Pods started after the agent add bind mounts the agent must see.
    assert _mount_of(pod, "netns")["mountPropagation"] == "HostToContainer"
    assert not any(hp.startswith("/proc") for hp, _, _ in _host_paths(pod).values())
    assert env["STATE_DIR"]["value"] == "/run/halfclose"


def test_agent_host_pid_is_an_opt_in_that_brings_ptrace_and_proc() -> None:
    pod = _pod(chart.render({"agent": {"hostPID": True}}), "DaemonSet")
    container = _container(pod)
    env = _env(container)
    assert pod["hostPID"] is True
    caps = container["securityContext"]["capabilities"]
    assert sorted(caps["add"]) == sorted(BASE_CAPS | {"SYS_PTRACE"})
    assert env["HOST_PROC"]["value"] == "/host/proc" and "NETNS_DIR" not in env
    assert sorted(_host_paths(pod).values()) == [
        ("/proc", "/host/proc", True),  # host /proc: read-only
        ("/run/halfclose", "/run/halfclose", False),
    ]


@pytest.mark.parametrize("host_pid", [False, True])
def test_agent_sysctl_patching_mounts_only_net_sysctls_writable(host_pid: bool) -> None:
    values = {"agent": {"hostPID": host_pid, "sysctlPatching": {"enabled": True}}}
    pod = _pod(chart.render(values), "DaemonSet")
    writable = sorted((hp, mp) for hp, mp, ro in _host_paths(pod).values() if not ro)
    assert writable == [
        ("/proc/sys/net", "/host/proc/sys/net"),
        ("/run/halfclose", "/run/halfclose"),
    ]
    assert _env(_container(pod))["SYSCTL_PROC"]["value"] == "/host/proc"


def test_agent_writable_sysctls_are_off_by_default(default_manifests: list[chart.Manifest]) -> None:
    defaults = yaml.safe_load((chart.CHART / "values.yaml").read_text(encoding="utf-8"))
    assert defaults["agent"]["sysctlPatching"]["enabled"] is False
    writable = [hp for hp, _, ro in _host_paths(_pod(default_manifests, "DaemonSet")).values()
                if not ro]  # fmt: skip
    assert writable == ["/run/halfclose"]


def test_agent_host_proc_follows_its_mount_path(full_manifests: list[chart.Manifest]) -> None:
    pod = _pod(full_manifests, "DaemonSet")
    mounts = {hp: mp for hp, mp, _ in _host_paths(pod).values()}
    assert _env(_container(pod))["HOST_PROC"]["value"] == mounts["/proc"] == "/hostproc"
    assert mounts["/proc/sys/net"] == "/hostproc/sys/net"
    assert _env(_container(pod))["SYSCTL_PROC"]["value"] == "/hostproc"


def test_agent_netns_dir_is_a_value() -> None:
    pod = _pod(chart.render({"agent": {"netnsDir": "/run/crio/ns"}}), "DaemonSet")
    assert ("/run/crio/ns", "/host/run/netns", True) in _host_paths(pod).values()


def _capability_comments(text: str) -> dict[str, str]:
    """Capability added in the template -> the comment block right above it."""
    out: dict[str, str] = {}
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("# "))
        elif re.fullmatch(r"- [A-Z_]+", stripped):
            out[stripped[2:]] = " ".join(block)
            block = []
        elif not stripped.startswith("{{"):
            block = []
    return out


def test_every_capability_says_what_it_is_for_and_what_abuse_allows() -> None:
    comments = _capability_comments(DAEMONSET_TEMPLATE.read_text(encoding="utf-8"))
    assert set(comments) == BASE_CAPS | {"SYS_PTRACE", "NET_RAW", "DAC_READ_SEARCH"}
    for cap, comment in comments.items():
        assert comment.startswith(cap), (cap, comment)
        assert "If abused:" in comment, cap


def test_seccomp_comment_does_not_claim_to_confine_sys_admin() -> None:
    """RuntimeDefault allows mount, unshare, setns and bpf once CAP_SYS_ADMIN is held."""
    text = DAEMONSET_TEMPLATE.read_text(encoding="utf-8")
    seccomp = text[text.index("seccompProfile:") : text.index("type: RuntimeDefault")]
    assert "nothing like mount" not in seccomp
    assert "does NOT confine" in seccomp and "mount" in seccomp and "bpf" in seccomp


def test_agent_runs_on_every_node_and_is_probed(default_manifests: list[chart.Manifest]) -> None:
    ds = chart.one(default_manifests, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = _container(pod)
    assert {"operator": "Exists"} in pod["tolerations"]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert container["command"] == ["halfclose-agent"]
    node = _env(container)["NODE_NAME"]
    assert node["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert _env(container)["METRICS_PORT"]["value"] == str(port) == "9479"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_agent_priority_class_is_optional(full_manifests: list[chart.Manifest]) -> None:
    assert "priorityClassName" not in _pod(chart.render(), "DaemonSet")
    assert _pod(full_manifests, "DaemonSet")["priorityClassName"] == "system-node-critical"


# --- the operator ---------------------------------------------------------------


def test_operator_runs_unprivileged(manifests: list[chart.Manifest]) -> None:
    pod = _pod(manifests, "Deployment")
    container = _container(pod)
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert not pod.get("hostPID") and not pod.get("hostNetwork")
    assert all("hostPath" not in v for v in pod["volumes"])
    assert container["command"] == ["halfclose-operator"]


def test_operator_image_user_is_the_pod_user() -> None:
    """Every image's USER (the agent and operator targets) is the uid the operator pod asks for."""
    dockerfile = (chart.REPO / "Dockerfile").read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", dockerfile, flags=re.MULTILINE)
    assert users and set(users) == {("65532", "65532")}


def test_operator_replicas_elect_a_leader(default_manifests: list[chart.Manifest]) -> None:
    deploy = chart.one(default_manifests, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    env = _env(_container(deploy["spec"]["template"]["spec"]))
    # The operator creates this ClusterKopfPeering object and meets its peers there.
    assert env["HALFCLOSE_OPERATOR_PEERING"]["value"] == chart.RELEASE
    assert "HALFCLOSE_OPERATOR_STANDALONE" not in env
    pdb = chart.one(default_manifests, "PodDisruptionBudget")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = _container(deploy["spec"]["template"]["spec"])
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9480, "health": 8080}
    assert env["HALFCLOSE_OPERATOR_METRICS_PORT"]["value"] == "9480"
    assert env["HALFCLOSE_OPERATOR_LIVENESS_PORT"]["value"] == "8080"


def test_operator_peering_name_can_be_set(full_manifests: list[chart.Manifest]) -> None:
    env = _env(_container(_pod(full_manifests, "Deployment")))
    assert env["HALFCLOSE_OPERATOR_PEERING"]["value"] == "halfclose-production"


def test_single_operator_without_peering_runs_standalone() -> None:
    rendered = chart.render({"operator": {"replicas": 1, "leaderElection": {"enabled": False}}})
    assert chart.of_kind(rendered, "PodDisruptionBudget") == []
    env = _env(_container(_pod(rendered, "Deployment")))
    assert env["HALFCLOSE_OPERATOR_STANDALONE"]["value"] == "true"
    assert "HALFCLOSE_OPERATOR_PEERING" not in env


# --- RBAC -----------------------------------------------------------------------

# The permissions come from one record of the calls the code makes (support/rbac.py);
# tests/kube/test_rbac.py checks that record against a real API server.
AGENT_RULES = rbac.rules("agent")
OPERATOR_RULES = rbac.rules("operator")


def _grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize(("component", "expected"), [("agent", AGENT_RULES),
                                                     ("operator", OPERATOR_RULES)])  # fmt: skip
def test_rbac_is_exactly_least_privilege(
    manifests: list[chart.Manifest], component: str, expected: dict[tuple[str, str], set[str]]
) -> None:
    role = chart.one(manifests, "ClusterRole", f"-{component}")
    grants = _grants(role)
    assert grants == expected
    flat = [
        x for rule in role["rules"] for k in ("apiGroups", "resources", "verbs") for x in rule[k]
    ]
    assert "*" not in flat
    assert not any("secret" in resource for _, resource in grants)
    binding = chart.one(manifests, "ClusterRoleBinding", f"-{component}")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    kind = "DaemonSet" if component == "agent" else "Deployment"
    account = _pod(manifests, kind)["serviceAccountName"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": chart.NAMESPACE}
    ]
    assert account in {m.name for m in chart.of_kind(manifests, "ServiceAccount")}


def test_no_role_anywhere_grants_wildcards_or_secrets(manifests: list[chart.Manifest]) -> None:
    roles = chart.of_kind(manifests, "ClusterRole") + chart.of_kind(manifests, "Role")
    assert roles
    for role in roles:
        for rule in role.obj["rules"]:
            for key in ("apiGroups", "resources", "verbs", "nonResourceURLs"):
                assert "*" not in rule.get(key, ()), role.name
            assert "secrets" not in rule.get("resources", ()), role.name


# --- admission: node-bound writes -------------------------------------------------


def test_node_bound_writes_policy_judges_only_the_agent(
    manifests: list[chart.Manifest],
) -> None:
    policy = chart.one(manifests, "ValidatingAdmissionPolicy", "-node-bound")
    binding = chart.one(manifests, "ValidatingAdmissionPolicyBinding", "-node-bound")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    account = _pod(manifests, "DaemonSet")["serviceAccountName"]
    user = f"system:serviceaccount:{chart.NAMESPACE}:{account}"
    assert [c["expression"] for c in spec["matchConditions"]] == [
        f"request.userInfo.username == '{user}'"
    ]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r["operations"]
             for r in spec["matchConstraints"]["resourceRules"]}  # fmt: skip
    # Every write verb the agent's RBAC grants on these resources is judged.
    assert rules == {
        (("halfclose.io",), ("halfclosereports", "halfclosereports/status")): [
            "CREATE", "UPDATE", "DELETE"],
        (("",), ("events",)): ["CREATE", "UPDATE", "DELETE"],
    }  # fmt: skip
    text = " ".join(v["expression"] for v in spec["validations"])
    for field in ("spec.nodeName", "halfclose.io/node", "reportingInstance", "source.host",
                  "oldObject"):  # fmt: skip
        assert field in text


def test_node_bound_writes_policy_can_be_switched_off() -> None:
    rendered = chart.render({"admission": {"nodeBoundWrites": {"enabled": False}}})
    assert chart.of_kind(rendered, "ValidatingAdmissionPolicy") == []
    assert chart.of_kind(rendered, "ValidatingAdmissionPolicyBinding") == []


# --- metrics: NetworkPolicy and authentication ------------------------------------------


def test_no_network_policy_by_default(default_manifests: list[chart.Manifest]) -> None:
    assert chart.of_kind(default_manifests, "NetworkPolicy") == []


@pytest.mark.parametrize(("component", "kind"), [("agent", "DaemonSet"),
                                                 ("operator", "Deployment")])  # fmt: skip
def test_network_policy_admits_only_the_scrapers_to_the_metrics_port(
    full_manifests: list[chart.Manifest], component: str, kind: str
) -> None:
    policy = chart.one(full_manifests, "NetworkPolicy", f"-{component}-metrics")
    workload = chart.one(full_manifests, kind)
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = _container(workload["spec"]["template"]["spec"])["ports"]
    port = next(p["containerPort"] for p in ports if p["name"] == "metrics")
    assert policy["spec"]["ingress"] == [
        {"from": chart.full_values()["networkPolicy"]["metricsFrom"],
         "ports": [{"protocol": "TCP", "port": port}]}
    ]  # fmt: skip
    # The other component's pods are not selected by this policy.
    other = "operator" if component == "agent" else "agent"
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] != other


def test_network_policy_without_sources_admits_nobody() -> None:
    rendered = chart.render({"networkPolicy": {"enabled": True}})
    policies = chart.of_kind(rendered, "NetworkPolicy")
    assert len(policies) == 2
    assert all(p.obj["spec"]["ingress"] == [] for p in policies)


def test_metrics_auth_is_off_by_default(default_manifests: list[chart.Manifest]) -> None:
    names = {m.name for m in chart.of_kind(default_manifests, "ClusterRole")}
    assert not any("metrics" in n for n in names)
    for kind in ("DaemonSet", "Deployment"):
        env = _env(_container(_pod(default_manifests, kind)))
        assert not any("METRICS_AUTH" in name for name in env)


def test_metrics_auth_grants_reviews_only_when_enabled(
    full_manifests: list[chart.Manifest],
) -> None:
    role = chart.one(full_manifests, "ClusterRole", "-metrics-auth")
    assert _grants(role) == {
        ("authentication.k8s.io", "tokenreviews"): {"create"},
        ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
    }
    binding = chart.one(full_manifests, "ClusterRoleBinding", "-metrics-auth")
    accounts = {_pod(full_manifests, k)["serviceAccountName"] for k in ("DaemonSet", "Deployment")}
    assert {s["name"] for s in binding["subjects"]} == accounts
    reader = chart.one(full_manifests, "ClusterRole", "-metrics-reader")
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    agent_env = _env(_container(_pod(full_manifests, "DaemonSet")))
    operator_env = _env(_container(_pod(full_manifests, "Deployment")))
    assert agent_env["METRICS_AUTH"]["value"] == "true"
    assert agent_env["METRICS_AUTH_CACHE_SECONDS"]["value"] == "30"
    assert operator_env["HALFCLOSE_OPERATOR_METRICS_AUTH"]["value"] == "true"
    assert operator_env["HALFCLOSE_OPERATOR_METRICS_AUTH_CACHE_SECONDS"]["value"] == "30"


# --- wiring ---------------------------------------------------------------------


@pytest.mark.parametrize(("component", "kind"), [("agent", "DaemonSet"),
                                                 ("operator", "Deployment")])  # fmt: skip
def test_services_and_monitors_reach_the_metrics_port(
    full_manifests: list[chart.Manifest], component: str, kind: str
) -> None:
    workload = chart.one(full_manifests, kind)
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    service = chart.one(full_manifests, "Service", f"-{component}")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    container_ports = {
        p["name"] for p in workload["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert "metrics" in container_ports
    monitor = chart.one(full_manifests, "ServiceMonitor", f"-{component}")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    # The job label comes from the Service (or pod) label the monitor names.
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert job == chart.full_values()["metrics"][f"{component}Job"]
    assert pod_labels[monitor["spec"]["jobLabel"]] == job  # for the PodMonitor
    honor = monitor["spec"]["endpoints"][0].get("honorLabels", False)
    assert honor is (component == "agent")  # the workload's namespace/pod labels win


def test_service_monitors_present_a_token_only_with_metrics_auth(
    full_manifests: list[chart.Manifest],
) -> None:
    token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    for component in ("agent", "operator"):
        monitor = chart.one(full_manifests, "ServiceMonitor", f"-{component}")
        assert monitor["spec"]["endpoints"][0]["bearerTokenFile"] == token
    plain = chart.render({"metrics": {"serviceMonitor": {"enabled": True}}})
    for m in chart.of_kind(plain, "ServiceMonitor"):
        assert "bearerTokenFile" not in m.obj["spec"]["endpoints"][0]
