"""Kernel adapters: netns entry, netlink codecs (sock_diag, ctnetlink), NAT rules, /proc.

The only layer that talks to the kernel (docs/architecture.md).  Each module is one
kernel interface; the hot paths parse netlink with ``struct`` directly
(docs/detection.md, codec notes).
"""
