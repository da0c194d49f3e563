"""Names of the halfclose.io API (docs/api.md): group, version, kinds, plurals."""

from __future__ import annotations

GROUP = "halfclose.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "halfclose"

POLICY_KIND = "HalfClosePolicy"
POLICY_PLURAL = "halfclosepolicies"
POLICY_SINGULAR = "halfclosepolicy"
POLICY_SHORT_NAME = "hcp"

REPORT_KIND = "HalfCloseReport"
REPORT_PLURAL = "halfclosereports"
REPORT_SINGULAR = "halfclosereport"
REPORT_SHORT_NAME = "hcr"

# Labels the agent puts on every report so that `kubectl get hcr -l ...` and the
# operator can find a policy's or a node's reports without reading them all.
POLICY_LABEL = f"{GROUP}/policy"
NODE_LABEL = f"{GROUP}/node"

# The one namespace a selector never reaches: kube-system runs the cluster's own
# plumbing (DNS, CNI, kube-proxy), so a policy applies there only when it names
# it in spec.namespaces.  A namespaceSelector of {} therefore means "every
# namespace but kube-system".
EXPLICIT_ONLY_NAMESPACES = frozenset({"kube-system"})
