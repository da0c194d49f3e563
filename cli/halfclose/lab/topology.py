"""Names and addresses of a lab, and the ``ip -batch`` lines that build it (pure).

::

    netns <prefix>-pod<i>                     netns <prefix>-up
    eth0 192.0.2.(10+i)/24  <-- veth -->  veth<i> --+-- br0 192.0.2.1/24
    203.0.113.0/24 via 192.0.2.1                    svc0 203.0.113.10/24 (dummy)
                                                    upstream server :7777

Every name is created inside the lab's own namespaces (``ip -n``), never in
the root namespace, so concurrent labs cannot collide on interface names and
only the netns names carry the prefix.  TEST-NET addresses only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from halfclose.agent.core.model import Endpoint
from halfclose.lab.errors import LabError

POD_NETWORK = ipaddress.IPv4Network("192.0.2.0/24")
GATEWAY = ipaddress.IPv4Address("192.0.2.1")
FIRST_POD_HOST = 10
SERVICE_NETWORK = ipaddress.IPv4Network("203.0.113.0/24")
SERVICE = Endpoint(ipaddress.IPv4Address("203.0.113.10"), 7777)

POD_DEVICE = "eth0"  # what the pod sees, as in a real pod
BRIDGE = "br0"
# The service address sits on the upstream netns's loopback: no dummy
# interface needed (kernels built without CONFIG_DUMMY exist, this one is one).
SERVICE_DEVICE = "lo"


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    pods: int
    # Ambient: ztunnel's own netns (a node-level pod, lo only), <prefix>-zt.
    node_proxy: bool = False

    @property
    def upstream_netns(self) -> str:
        return f"{self.prefix}-up"

    @property
    def node_netns(self) -> str:
        return f"{self.prefix}-zt"

    def pod_netns(self, index: int) -> str:
        self._check(index)
        return f"{self.prefix}-pod{index}"

    def pod_ip(self, index: int) -> ipaddress.IPv4Address:
        self._check(index)
        return POD_NETWORK.network_address + FIRST_POD_HOST + index

    @staticmethod
    def host_veth(index: int) -> str:
        # Lives in the upstream netns only; "veth199" is far below IFNAMSIZ (15).
        return f"veth{index}"

    @property
    def all_netns(self) -> tuple[str, ...]:
        """Pods first: deleting them first takes their veths out of the bridge."""
        node = (self.node_netns,) if self.node_proxy else ()
        return (*(self.pod_netns(i) for i in range(self.pods)), self.upstream_netns, *node)

    def upstream_batch(self) -> list[str]:
        """``ip -n <upstream> -batch -`` lines: bridge, service address, pod veths."""
        lines = [
            "link set lo up",
            f"link add {BRIDGE} type bridge",
            f"addr add {GATEWAY}/{POD_NETWORK.prefixlen} dev {BRIDGE}",
            f"link set {BRIDGE} up",
            f"addr add {SERVICE.ip}/32 dev {SERVICE_DEVICE}",
        ]
        for i in range(self.pods):
            veth = self.host_veth(i)
            lines += [
                # Both ends are born in their final namespaces: no name ever
                # exists in the root netns.
                f"link add {veth} type veth peer name {POD_DEVICE} netns {self.pod_netns(i)}",
                f"link set {veth} master {BRIDGE}",
                f"link set {veth} up",
            ]
        return lines

    def pod_batch(self, index: int) -> list[str]:
        """``ip -n <pod> -batch -`` lines.  No default route: nothing can leave the lab."""
        return [
            "link set lo up",
            f"addr add {self.pod_ip(index)}/{POD_NETWORK.prefixlen} dev {POD_DEVICE}",
            f"link set {POD_DEVICE} up",
            f"route add {SERVICE_NETWORK} via {GATEWAY} dev {POD_DEVICE}",
        ]

    def _check(self, index: int) -> None:
        if not 0 <= index < self.pods:
            raise LabError(f"no pod {index} in lab {self.prefix!r} (pods 0..{self.pods - 1})")


def netns_pattern(prefix: str) -> re.Pattern[str]:
    """Matches exactly the netns names a lab with this prefix can create."""
    return re.compile(rf"{re.escape(prefix)}-(?:up|zt|pod\d+)")
