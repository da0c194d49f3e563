#!/usr/bin/env bash
# Provide kube-apiserver, etcd and kube-controller-manager for the kube tests
# (the envtest convention) and print the folder that holds them.
#
#   KUBEBUILDER_ASSETS set   -> use that folder as it is (checked, never built).
#   otherwise                -> build pinned upstream versions from the Go module
#                               proxy into $HALFCLOSE_CACHE/kube/<version>/ once;
#                               a warm run finds the binaries + stamp and returns.
#
# Kubernetes is built from a throwaway wrapper module: k8s.io/kubernetes requires
# its staging modules (k8s.io/api, ...) at v0.0.0 and replaces them with local
# ./staging paths that the published module does not contain, so the wrapper
# replaces every such module with its published v0.<minor>.<patch> tag.
# etcd is a three-line main around etcdmain.
#
# Only progress goes to stderr; stdout is the folder (one line).
#   --locate: print the folder if the binaries are there, else exit 1 (never builds).
set -euo pipefail
locate_only=0
[[ "${1:-}" == "--locate" ]] && locate_only=1

KUBE_VERSION="${KUBE_VERSION:-v1.37.2}"   # newest k8s.io/kubernetes on the proxy that builds with Go 1.26
ETCD_VERSION="${ETCD_VERSION:-v3.7.3}"    # newest etcd 3.7 patch (Kubernetes 1.37 requires etcd 3.7)
BINS=(kube-apiserver kube-controller-manager etcd)

log() { printf 'kube-assets: %s\n' "$*" >&2; }
die() { printf 'kube-assets: %s\n' "$*" >&2; exit 2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    for b in "${BINS[@]}"; do
        [[ -x "$KUBEBUILDER_ASSETS/$b" ]] || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no executable $b"
    done
    printf '%s\n' "$KUBEBUILDER_ASSETS"
    exit 0
fi

cache="${HALFCLOSE_CACHE:-$HOME/.cache/halfclose}/kube/${KUBE_VERSION#v}"
bin="$cache/bin"
stamp="$bin/.stamp"
want="kubernetes=$KUBE_VERSION etcd=$ETCD_VERSION"

complete() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] || return 1
    for b in "${BINS[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
}

if complete; then
    printf '%s\n' "$bin"
    exit 0
fi
((locate_only)) && exit 1

PATH="$PATH:/usr/local/go/bin"   # where the Go tarball installs; CI's PATH may lack it
command -v go >/dev/null || die "go not found: install Go >= 1.26 or set KUBEBUILDER_ASSETS to a folder with ${BINS[*]}"

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9   # two builds at once (make -j, two shells) would only fight over memory
if complete; then printf '%s\n' "$bin"; exit 0; fi

export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
# Kubernetes 1.37 is released with Go 1.26, where encoding/json/v2 is off. A newer Go
# turns it on, and Kubernetes <= 1.36 then served a broken OpenAPI (every `kubectl
# apply` failed validation): build as the release does.
go_minor="$(go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')"
if [[ -n "$go_minor" ]] && ((go_minor >= 27)); then
    export GOEXPERIMENT="${GOEXPERIMENT:+$GOEXPERIMENT,}nojsonv2"
fi
# Two compile jobs: the kube-apiserver link alone takes ~2 GB; more jobs only add memory.
jobs="${KUBE_ASSETS_JOBS:-2}"
build=(go build -p "$jobs" -trimpath)
minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
staging_tag="v0.${KUBE_VERSION#v1.}"

buildlog="$cache/build.log"
: >"$buildlog"
failed() { tail -n 40 "$buildlog" >&2; die "building $1 failed (full log: $buildlog)"; }

# --- Kubernetes -------------------------------------------------------------
src="$cache/src/kubernetes"
mkdir -p "$src" "$bin"
log "resolving k8s.io/kubernetes@$KUBE_VERSION"
modfile="$(cd "$src" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" 2>>"$buildlog" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
[[ -f "$modfile" ]] || die "could not download k8s.io/kubernetes@$KUBE_VERSION from the Go module proxy"
staging=$(awk '/^require \(/{r=1;next} r&&/^\)/{r=0} r&&$2=="v0.0.0"{print $1}' "$modfile")
[[ -n "$staging" ]] || die "no staging modules found in $modfile"
{
    printf 'module halfclose.local/kube-assets\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\n' "$KUBE_VERSION"
    for m in $staging; do printf 'replace %s => %s %s\n' "$m" "$m" "$staging_tag"; done
} >"$src/go.mod"
: >"$src/go.sum"

ver="k8s.io/component-base/version"
cver="k8s.io/client-go/pkg/version"
xflags=""
for p in "$ver" "$cver"; do
    xflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
log "building kube-apiserver and kube-controller-manager $KUBE_VERSION (about 10 min on 2 cores, ~2 GB; log: $buildlog)"
(cd "$src" && nice -n 10 "${build[@]}" -ldflags="-s -w$xflags" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager) \
    >>"$buildlog" 2>&1 || failed "Kubernetes"

# --- etcd ---------------------------------------------------------------------
esrc="$cache/src/etcd"
mkdir -p "$esrc"
cat >"$esrc/go.mod" <<GOMOD
module halfclose.local/etcd

go 1.26

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
cat >"$esrc/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
: >"$esrc/go.sum"
log "building etcd $ETCD_VERSION"
(cd "$esrc" && nice -n 10 "${build[@]}" -ldflags="-s -w" -o "$bin/etcd" .) >>"$buildlog" 2>&1 || failed "etcd"

for b in "${BINS[@]}"; do [[ -x "$bin/$b" ]] || die "build finished without $bin/$b"; done
printf '%s\n' "$want" >"$stamp"
log "built into $bin"
printf '%s\n' "$bin"
