#!/usr/bin/env bash
# kubelet and kube-scheduler for `make e2e-node`, built like hack/kube-assets.sh
# builds the control plane: from k8s.io/kubernetes on the Go module proxy through
# the same wrapper module (staging modules replaced by their published tags),
# cached in $HALFCLOSE_CACHE/node/kube-<version>/bin. A warm run only checks the
# stamp. Prints the folder (stdout, one line); progress goes to stderr.
set -euo pipefail
KUBE_VERSION="${KUBE_VERSION:-v1.37.2}"   # same pin as hack/kube-assets.sh
BINS=(kubelet kube-scheduler)
log() { printf 'node-kube: %s\n' "$*" >&2; }
die() { printf 'node-kube: %s\n' "$*" >&2; exit 2; }

cache="${HALFCLOSE_CACHE:-$HOME/.cache/halfclose}/node/kube-${KUBE_VERSION#v}"
bin="$cache/bin"; stamp="$bin/.stamp"; want="kubernetes=$KUBE_VERSION"
complete() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] || return 1
    for b in "${BINS[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
}
if complete; then printf '%s\n' "$bin"; exit 0; fi

PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || die "go not found: install Go >= 1.26"
mkdir -p "$bin" "$cache/src"
exec 9>"$cache/.lock"; flock 9
if complete; then printf '%s\n' "$bin"; exit 0; fi

export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
go_minor="$(go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')"
if [[ -n "$go_minor" ]] && ((go_minor >= 27)); then export GOEXPERIMENT="${GOEXPERIMENT:+$GOEXPERIMENT,}nojsonv2"; fi
minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
staging_tag="v0.${KUBE_VERSION#v1.}"
src="$cache/src/kubernetes"; mkdir -p "$src"
buildlog="$cache/build.log"; : >"$buildlog"
modfile="$(cd "$src" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" 2>>"$buildlog" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
[[ -f "$modfile" ]] || die "could not download k8s.io/kubernetes@$KUBE_VERSION"
staging=$(awk '/^require \(/{r=1;next} r&&/^\)/{r=0} r&&$2=="v0.0.0"{print $1}' "$modfile")
{
    printf 'module halfclose.local/node-kube\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\n' "$KUBE_VERSION"
    for m in $staging; do printf 'replace %s => %s %s\n' "$m" "$m" "$staging_tag"; done
} >"$src/go.mod"
: >"$src/go.sum"
xflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    xflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
log "building ${BINS[*]} $KUBE_VERSION (log: $buildlog)"
(cd "$src" && nice -n 10 go build -p "${KUBE_ASSETS_JOBS:-2}" -trimpath -ldflags="-s -w$xflags" -o "$bin/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler) >>"$buildlog" 2>&1 \
    || { tail -n 40 "$buildlog" >&2; die "build failed (log: $buildlog)"; }
for b in "${BINS[@]}"; do [[ -x "$bin/$b" ]] || die "build finished without $bin/$b"; done
printf '%s\n' "$want" >"$stamp"
log "built into $bin"
printf '%s\n' "$bin"
