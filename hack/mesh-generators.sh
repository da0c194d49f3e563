#!/usr/bin/env bash
# Build the service meshes' own rule generators for tests/integration/test_generators.py:
#
#   istio-iptables      istio.io/istio/tools/istio-iptables/pkg/cmd (the pilot-agent
#                       subcommand: sidecar rules, iptables-nft/legacy and --native-nftables)
#   istio-inpod         istio.io/istio/cni/pkg/{iptables,nftables}: the ambient in-pod rules
#                       istio-cni writes into an app pod's netns
#   linkerd-proxy-init  github.com/linkerd/linkerd2-proxy-init/cmd (proxy-init)
#
# Each is a main.go + go.mod under hack/mesh/<name>/ that imports the mesh's module
# *by version* from the Go module proxy; no mesh code is kept in this repository.
# Binaries are cached outside the repo, keyed by the module version, so a warm run
# (a fresh CI clone on the same machine included) builds nothing:
#
#   ${HALFCLOSE_CACHE:-$HOME/.cache/halfclose}/mesh/<name>-<version>/<name>
#
# Usage: hack/mesh-generators.sh            build what is missing, print one line each
#        hack/mesh-generators.sh --path N   print the binary path of generator N
# Without Go the tests that need these skip, so this says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/mesh"
CACHE="${HALFCLOSE_CACHE:-$HOME/.cache/halfclose}/mesh"
GENERATORS=(istio-iptables istio-inpod linkerd-proxy-init)

# The version of the mesh module a wrapper imports (its first require).
version() {
	awk '/^require/ { if ($2 == "(") { getline; print $2 } else print $3; exit }' "$1/go.mod"
}

binary() { echo "$CACHE/$1-$(version "$1")/$1"; }

if [[ "${1:-}" == "--path" ]]; then
	binary "$2"
	exit 0
fi

if ! command -v go >/dev/null; then
	echo "mesh-tools: go not found: the generator tests will be skipped" >&2
	exit 0
fi

for name in "${GENERATORS[@]}"; do
	out="$(binary "$name")"
	if [[ -x "$out" ]]; then
		echo "mesh-tools: $name $(version "$name") cached ($out)"
		continue
	fi
	start=$(date +%s)
	mkdir -p "$(dirname "$out")"
	# go.sum pins every module; -mod=readonly fails rather than change go.mod.
	(cd "$name" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -o "$out.tmp" .)
	mv "$out.tmp" "$out"
	echo "mesh-tools: $name $(version "$name") built in $(($(date +%s) - start))s ($out)"
done
