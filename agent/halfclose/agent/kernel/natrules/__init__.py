"""Capture ports from a netns's own interception rules (docs/detection.md, part 2).

A sidecar is fed by REDIRECT or DNAT-to-a-local-port rules (nat) or TPROXY
rules (mangle); their target ports are the ports whose half-closed sockets we
judge.  Rules live in one of three places and a pod may use any of them, so all
are read:

- iptables-nft  (``iptables-save``, ``ip6tables-save``)
- iptables-legacy (``iptables-legacy-save``, ``ip6tables-legacy-save``)
- native nftables (``nft -j list ruleset``: ``redirect``, ``dnat``, ``tproxy``)

Only **TCP** captures count: a leak is a TCP socket, and a rule that matches
UDP only (Istio ambient's ``-p udp --dport 53 -j REDIRECT --to-ports 15053``)
says nothing about TCP sockets on that port.  TPROXY is not NAT (a late FIN is
delivered, not dropped, unless a rule drops conntrack-INVALID packets), so its
ports are kept apart from the NAT ports, along with whether such a drop rule
exists (Istio's DROP_INVALID).

Each tool runs inside the target netns (nsenter on our pinned netns fd), in
parallel: they are independent and each costs a process start.  A tool that is
missing or fails is recorded, not fatal; only when *no* source could be read is
that the user's problem (they can pass ``--capture-ports``).

Modules: ``capture`` (what a capture is, and one netns's view over all
sources), ``iptables`` and ``nft`` (the parsers), ``sources`` (running the tools
in the netns).  The parsers are pure functions over the tools' text so they are
unit-tested on saved output (and on the rules the meshes' own generators write:
tests/integration/test_generators.py).
"""
