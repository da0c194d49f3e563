#!/usr/bin/env bash
# Debian packages e2e-node needs: containerd + runc (the runtime; containerd
# 1.6 still works with kubelet 1.37, whose fallback for runtimes without the
# RuntimeConfig CRI call is removed only in 1.38), the CNI plugins (bridge,
# host-local, loopback) and mmdebstrap (the images' base). The script runs
# its own containerd with its own socket and state: a system containerd the
# package may start is neither used nor touched.
set -euo pipefail
need=()
for pair in containerd:containerd containerd-shim-runc-v2:containerd ctr:containerd runc:runc \
            /usr/lib/cni/bridge:containernetworking-plugins mmdebstrap:mmdebstrap \
            nsenter:util-linux openssl:openssl iptables:iptables; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  if [[ "$cmd" == /* ]]; then [[ -x "$cmd" ]] || need+=("$pkg"); else command -v "$cmd" >/dev/null || need+=("$pkg"); fi
done
((${#need[@]})) || exit 0
[[ "$(id -u)" == 0 ]] || { echo "e2e-node: missing ${need[*]} (run as root to install them)" >&2; exit 2; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
