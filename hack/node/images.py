"""Build the e2e-node images offline and write them as OCI image archives.

No registry can be pulled here and there is no Docker engine, so:

* every image starts from the Debian bookworm root filesystem that
  hack/node/rootfs.sh builds with mmdebstrap from Debian's own packages;
* the halfclose image follows the repository's Dockerfile: a small
  interpreter runs its instructions (ARG, FROM ... AS, ENV, WORKDIR, COPY
  [--from], RUN, LABEL, USER, CMD, ENTRYPOINT) in a chroot of a copy of that
  root filesystem, one copy per stage, so whatever the Dockerfile says (stages,
  per-program targets, pinned requirements) is what gets built; ``FROM`` of a
  registry image is replaced by the Debian base (python3 3.11 as in the
  Dockerfile's python:3.11 image);
* the pause image is a 20-line static Go program;
* the mesh image holds the test workload's programs (hack/node/workload/),
  HAProxy (the sidecar) and the real istio-iptables built by
  hack/mesh-generators.sh (the init container).

Each image is one uncompressed layer in an OCI image layout tar (oci-layout,
index.json, blobs/sha256/...) that ``ctr images import`` reads. Archives are
cached under $HALFCLOSE_CACHE/node/images/ by a key over their inputs, so a
warm run builds nothing.

Usage: python hack/node/images.py OUTDIR  -> prints "name=archive" lines.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("HALFCLOSE_CACHE") or Path.home() / ".cache" / "halfclose") / "node"

HALFCLOSE_REF = "hcn.local/halfclose:e2e"
PAUSE_REF = "hcn.local/pause:e2e"
MESH_REF = "hcn.local/mesh:e2e"


def log(msg: str) -> None:
    print(f"images: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]


# --------------------------------------------------------------------------- OCI archive


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer_tar(root: Path, dest: Path) -> tuple[str, int]:
    """Tar ROOT's tree (numeric owners, sorted); returns (sha256 digest, size)."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.isdev() and not info.ischr():
            return None
        info.uname = info.gname = ""
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(root)):
            tar.add(root / name, arcname=name, filter=keep)
    h = hashlib.sha256()
    with dest.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), dest.stat().st_size


def write_oci(root: Path, ref: str, config: dict[str, object], out: Path) -> None:
    """An OCI image layout tar holding one image: ROOT as its single layer."""
    with tempfile.TemporaryDirectory(prefix="hcn-oci-", dir=CACHE) as tmp:
        layer = Path(tmp) / "layer.tar"
        layer_digest, layer_size = _layer_tar(root, layer)
        image_config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "2026-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": f"hack/node/images.py {ref}"}],
        }
        cfg = json.dumps(image_config, sort_keys=True).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": _digest(cfg),
                    "size": len(cfg),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest,
                        "size": layer_size,
                    }
                ],
            },
            sort_keys=True,
        ).encode()
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": _digest(manifest),
                        "size": len(manifest),
                        "platform": {"architecture": "amd64", "os": "linux"},
                        "annotations": {
                            "io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                        },
                    }
                ],
            }
        ).encode()
        part = out.with_suffix(".part")
        with tarfile.open(part, "w") as tar:

            def put(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))

            put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            put("index.json", index)
            put(f"blobs/sha256/{_digest(cfg)[7:]}", cfg)
            put(f"blobs/sha256/{_digest(manifest)[7:]}", manifest)
            tar.add(layer, arcname=f"blobs/sha256/{layer_digest[7:]}")
        part.rename(out)
    # Older archives of the same image are superseded.
    kind = out.name.rsplit("-", 1)[0]
    for old in out.parent.glob(f"{kind}-*.tar"):
        if old != out and old.name.rsplit("-", 1)[0] == kind:
            old.unlink()


# --------------------------------------------------------------------------- chroot


def chroot_run(root: Path, script: str, env: dict[str, str], workdir: str) -> None:
    """Run SCRIPT with /bin/sh -c in a chroot of ROOT, in a private mount
    namespace (proc, dev and resolv.conf mounted there vanish with it)."""
    (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # The host's CA bundle is lent to the build only (like a BuildKit secret):
    # HTTPS to PyPI may pass through a TLS proxy the host trusts.
    # PYTHONSAFEPATH: the python:* images' interpreter has `operator` imported
    # before `python -c` puts the working directory first on sys.path; Debian's
    # has not, and the context's top-level operator/ would shadow the stdlib's.
    env = {
        **env,
        "PIP_CERT": "/run/hcn-build-ca.crt",
        "SSL_CERT_FILE": "/run/hcn-build-ca.crt",
        "PYTHONSAFEPATH": "1",
    }
    envs = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    inner = (
        f"set -e; R={shlex.quote(str(root))}; "
        'mount -t proc proc "$R/proc"; mount --rbind /dev "$R/dev"; '
        'touch "$R/etc/resolv.conf" "$R/run/hcn-build-ca.crt"; '
        'mount --bind /etc/resolv.conf "$R/etc/resolv.conf"; '
        'mount --bind /etc/ssl/certs/ca-certificates.crt "$R/run/hcn-build-ca.crt"; '
        f'rc=0; chroot "$R" /usr/bin/env -i {envs} /bin/sh -c '
        + shlex.quote(f"cd {shlex.quote(workdir)} && {script}")
        + ' || rc=$?; umount "$R/run/hcn-build-ca.crt" "$R/etc/resolv.conf"; '
        'rm -f "$R/run/hcn-build-ca.crt"; exit $rc'
    )
    run(
        ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", inner],
        timeout=900,
        stdout=sys.stderr,
    )


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    name: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)


def _instructions(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _subst(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m[1], m[0]), value)


def _kv(rest: str, env: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for tok in shlex.split(rest):
        k, _, v = tok.partition("=")
        out[k] = _subst(v, env)
    return out


def _json_or_shell(rest: str) -> list[str]:
    if rest.startswith("["):
        return list(json.loads(rest))
    return ["/bin/sh", "-c", rest]


def build_dockerfile(
    dockerfile: Path, context: Path, base: Path, work: Path, target: str | None
) -> dict[str, Stage]:
    """Run DOCKERFILE's instructions up to the end of stage TARGET (default: all
    stages); returns every stage built, by name."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    cur: Stage | None = None
    for word, rest in _instructions(dockerfile.read_text(encoding="utf-8")):
        if word == "ARG":
            k, _, v = rest.partition("=")
            if cur is None:
                args[k] = v
            else:  # a stage's ARG: seen by its RUNs, not part of the image's Env
                cur.args.setdefault(k, _subst(v, {**args, **cur.env}))
        elif word == "FROM":
            parts = rest.split()
            name = (
                parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            )
            src = _subst(parts[0], args)
            if cur is not None and cur.name == target:
                break
            root = work / name
            if root.exists():
                shutil.rmtree(root)
            parent = stages.get(src)
            log(f"stage {name}: FROM {src} -> {'stage ' + src if parent else 'Debian base'}")
            run(["cp", "-a", "--reflink=auto", str(parent.root if parent else base), str(root)])
            cur = Stage(name, root)
            if parent:
                cur.env = dict(parent.env)
                cur.workdir, cur.user = parent.workdir, parent.user
                cur.cmd, cur.entrypoint = parent.cmd, parent.entrypoint
            else:
                cur.env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                # The python:* images' `python` is Debian's python3 here.
                python = root / "usr/local/bin/python"
                if not python.exists():
                    python.symlink_to("/usr/bin/python3")
            stages[name] = cur
        elif cur is None:
            continue
        elif word == "ENV":
            cur.env.update(_kv(rest, cur.env))
        elif word == "LABEL":
            cur.labels.update(_kv(rest, {**args, **cur.args, **cur.env}))
        elif word == "WORKDIR":
            cur.workdir = _subst(rest, cur.env)
            (cur.root / cur.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif word == "USER":
            cur.user = _subst(rest, cur.env)
        elif word == "CMD":
            cur.cmd = _json_or_shell(rest)
        elif word == "ENTRYPOINT":
            cur.entrypoint = _json_or_shell(rest)
        elif word == "COPY":
            toks = shlex.split(rest)
            from_stage = None
            while toks[0].startswith("--"):
                opt = toks.pop(0)
                if opt.startswith("--from="):
                    from_stage = stages[opt.split("=", 1)[1]]
            *srcs, dest = toks
            base_dir = from_stage.root if from_stage else context
            dest_abs = dest if dest.startswith("/") else f"{cur.workdir.rstrip('/')}/{dest}"
            target_path = cur.root / dest_abs.lstrip("/")
            for s in srcs:
                src_path = base_dir / s.lstrip("/")
                if src_path.is_dir():
                    target_path.mkdir(parents=True, exist_ok=True)
                    run(["cp", "-a", f"{src_path}/.", str(target_path)])
                else:
                    into = target_path
                    into.parent.mkdir(parents=True, exist_ok=True)
                    if dest.endswith("/"):
                        into.mkdir(parents=True, exist_ok=True)
                    run(["cp", "-a", str(src_path), str(into)])
        elif word == "RUN":
            script = (
                " ".join(_json_or_shell(rest)[2:])
                if not rest.startswith("[")
                else shlex.join(json.loads(rest))
            )
            log(f"stage {cur.name}: RUN {script[:100]}...")
            chroot_run(
                cur.root, script, {**args, **cur.args, **cur.env, "HOME": "/root"}, cur.workdir
            )
        else:
            log(f"stage {cur.name}: {word} ignored")
    assert cur is not None, "no FROM in the Dockerfile"
    if target and target not in stages:
        raise SystemExit(f"images: the Dockerfile has no stage {target!r}")
    stages[""] = cur  # the last stage built: `docker build` without --target
    return stages


def _context_files(context: Path) -> Path:
    """The build context: the files git tracks, from the work tree (as `docker
    build .` of this checkout sees them), or from the last commit with
    E2E_NODE_SOURCE=HEAD (a shared tree with others' edits in progress)."""
    ctx = Path(tempfile.mkdtemp(prefix="hcn-ctx-", dir=CACHE))
    if os.environ.get("E2E_NODE_SOURCE") == "HEAD":
        archive = subprocess.run(
            ["git", "-C", str(context), "archive", "--format=tar", "HEAD"],
            check=True,
            capture_output=True,
            timeout=120,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(ctx, filter="tar")
        return ctx
    listed = run(["git", "-C", str(context), "ls-files", "-z"], capture_output=True).stdout
    for f in filter(None, listed.split("\0")):
        src = context / f
        if src.is_file():
            (ctx / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ctx / f)
    return ctx


def _tree_key(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _file_key(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "-"


def _copy_sources(dockerfile: Path) -> list[str]:
    """The build-context paths the Dockerfile's COPY instructions read."""
    out = []
    for word, rest in _instructions(dockerfile.read_text(encoding="utf-8")):
        if word == "COPY":
            toks = [t for t in shlex.split(rest)]
            if any(t.startswith("--from=") for t in toks):
                continue
            out += [t.rstrip("/") for t in toks if not t.startswith("--")][:-1]
    return sorted(set(out))


def _stage_config(stage: Stage) -> dict[str, object]:
    cfg: dict[str, object] = {
        "Env": [f"{k}={v}" for k, v in stage.env.items()],
        "WorkingDir": stage.workdir,
        "Labels": stage.labels,
    }
    if stage.user:
        cfg["User"] = stage.user
    if stage.cmd:
        cfg["Cmd"] = stage.cmd
    if stage.entrypoint:
        cfg["Entrypoint"] = stage.entrypoint
    return cfg


# --------------------------------------------------------------------------- the images


def program_targets(dockerfile: Path) -> list[str]:
    """The Dockerfile's per-program targets (`agent`, `operator`), or [""]
    (one image, the last stage) when it has none."""
    names = {
        parts[2]
        for word, rest in _instructions(dockerfile.read_text(encoding="utf-8"))
        if word == "FROM" and len(parts := rest.split()) >= 3 and parts[1].upper() == "AS"
    }
    found: list[str] = [t for t in ("agent", "operator") if t in names]
    return found or [""]


def image_ref(target: str) -> str:
    return f"hcn.local/halfclose-{target}:e2e" if target else HALFCLOSE_REF


def halfclose_images(base: Path, base_key: str) -> dict[str, Path]:
    """Ref -> archive for each program image the Dockerfile defines."""
    ctx = _context_files(REPO)
    try:
        # Keyed by what the build reads: the Dockerfile and its COPY sources.
        h = hashlib.sha256(base_key.encode())
        for src in ["Dockerfile", *_copy_sources(ctx / "Dockerfile")]:
            path = ctx / src
            h.update(
                src.encode() + (_tree_key(path) if path.is_dir() else _file_key(path)).encode()
            )
        key = h.hexdigest()[:16]
        targets = program_targets(ctx / "Dockerfile")
        outs = {t: CACHE / "images" / f"halfclose-{t or 'default'}-{key}.tar" for t in targets}
        if all(o.exists() for o in outs.values()):
            return {image_ref(t): o for t, o in outs.items()}
        work = Path(tempfile.mkdtemp(prefix="hcn-build-", dir=CACHE))
        try:
            t0 = time.monotonic()
            last = "operator" if "operator" in targets else None
            stages = build_dockerfile(ctx / "Dockerfile", ctx, base, work, last)
            for t, out in outs.items():
                write_oci(stages[t].root, image_ref(t), _stage_config(stages[t]), out)
            log(f"halfclose image(s) {targets} built in {time.monotonic() - t0:.0f}s")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {image_ref(t): o for t, o in outs.items()}
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def pause_image() -> Path:
    src = HERE / "pause"
    key = _tree_key(src)
    out = CACHE / "images" / f"pause-{key}.tar"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="hcn-pause-", dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local"}
        env["PATH"] = env.get("PATH", "") + ":/usr/local/go/bin"
        run(
            ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(root / "pause"), "."],
            cwd=src,
            env=env,
        )
        write_oci(root, PAUSE_REF, {"Entrypoint": ["/pause"]}, out)
    return out


def mesh_image(base: Path, base_key: str) -> Path:
    istio = Path(
        run(
            ["bash", str(REPO / "hack" / "mesh-generators.sh"), "--path", "istio-iptables"],
            capture_output=True,
        ).stdout.strip()
    )
    if not istio.exists():
        raise SystemExit(
            f"images: {istio} missing: run `make mesh-tools` (hack/mesh-generators.sh)"
        )
    workload = HERE / "workload"
    key = hashlib.sha256(f"{base_key}{istio}{_tree_key(workload)}".encode()).hexdigest()[:16]
    out = CACHE / "images" / f"mesh-{key}.tar"
    if out.exists():
        return out
    work = Path(tempfile.mkdtemp(prefix="hcn-mesh-", dir=CACHE))
    try:
        root = work / "root"
        run(["cp", "-a", "--reflink=auto", str(base), str(root)])
        shutil.copy2(istio, root / "usr/local/bin/istio-iptables")
        shutil.copytree(workload, root / "workload")
        # Istio's proxy user: the sidecar runs as 1337, which the rules exempt.
        chroot_run(
            root,
            "groupadd -g 1337 istio-proxy"
            " && useradd -u 1337 -g 1337 -M -s /usr/sbin/nologin istio-proxy",
            {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            "/",
        )
        env = [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONUNBUFFERED=1",
        ]
        write_oci(root, MESH_REF, {"Env": env, "Cmd": ["sleep", "infinity"]}, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    outdir = Path(sys.argv[1]) if len(sys.argv) > 1 else CACHE / "images"
    (CACHE / "images").mkdir(parents=True, exist_ok=True)
    base = Path(run(["bash", str(HERE / "rootfs.sh")], capture_output=True).stdout.strip())
    base_key = base.parent.name
    built = {
        PAUSE_REF: pause_image(),
        **halfclose_images(base, base_key),
        MESH_REF: mesh_image(base, base_key),
    }
    outdir.mkdir(parents=True, exist_ok=True)
    for ref, path in built.items():
        print(f"{ref}={path}")


if __name__ == "__main__":
    main()
