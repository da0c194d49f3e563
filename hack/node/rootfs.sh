#!/usr/bin/env bash
# The Debian base root filesystem every e2e-node image is built on (no registry
# can be pulled here): bookworm from Debian's own packages with mmdebstrap.
# Python 3.11 (the Dockerfile's python:3.11 base), iptables + nftables (the
# agent reads rules with them), iproute2 (ss, ip), haproxy (the sidecar),
# conntrack, procps. Cached: $HALFCLOSE_CACHE/node/rootfs/<key>/root (a
# directory; images.py tars it into the images' first layer). Prints its path.
set -euo pipefail
SUITE=bookworm
PKGS=(python3 python3-venv ca-certificates iptables nftables iproute2 haproxy conntrack procps)
key="$SUITE-$(printf '%s\n' "${PKGS[@]}" | sha256sum | cut -c1-12)"
out="${HALFCLOSE_CACHE:-$HOME/.cache/halfclose}/node/rootfs/$key"
if [[ -f "$out/.done" ]]; then printf '%s\n' "$out/root"; exit 0; fi
command -v mmdebstrap >/dev/null || { echo "rootfs: mmdebstrap missing (apt-get install mmdebstrap)" >&2; exit 2; }
mkdir -p "$out"
exec 9>"$out/.lock"; flock 9
if [[ -f "$out/.done" ]]; then printf '%s\n' "$out/root"; exit 0; fi
echo "rootfs: mmdebstrap $SUITE (${PKGS[*]})" >&2
# minbase + the packages; no recommends; apt lists and docs dropped like the slim images.
timeout 900 mmdebstrap --mode=root --variant=minbase --format=directory --skip=output/dev \
    --include="$(IFS=,; echo "${PKGS[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$SUITE" "$out/root.part" http://deb.debian.org/debian >&2
rm -rf "$out/root"; mv "$out/root.part" "$out/root"; touch "$out/.done"
printf '%s\n' "$out/root"
