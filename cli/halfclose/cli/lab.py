"""``halfclose lab up|leak|status|down``: the leak lab from the shell (docs/lab.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from halfclose.errors import UserError
from halfclose.lab import BACKENDS, STYLES, Lab, LabError, LabSettings, PodStatus, ProxiedPair
from halfclose.lab.settings import (
    DEFAULT_PREFIX,
    MAX_CLOSE_WAIT_TIMEOUT,
    MAX_COUNT,
    MAX_PODS,
    validate_prefix,
)
from halfclose.lab.topology import SERVICE

SHOWN_ROWS = 20  # per table; a 5000-leak lab prints a summary, not 5000 lines
SHOWN_PODS = 3


def register(subparsers: Any) -> None:
    lab = subparsers.add_parser(
        "lab",
        help="the leak lab: network namespaces with an Envoy-like sidecar (root)",
        description="Reproduce the sidecar half-close leak in network namespaces (needs root).",
    )
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="{up,leak,status,down}")

    up = sub.add_parser("up", help="build a lab", description="Build a lab.")
    _prefix(up)
    up.add_argument("--pods", type=_int_in(1, MAX_PODS), default=1, help="pod netns (default 1)")
    up.add_argument("--style", choices=STYLES, default="istio", help="mesh NAT rules")
    up.add_argument("--backend", choices=BACKENDS, default="iptables-nft", help="rule backend")
    up.add_argument(
        "--close-wait-timeout",
        type=_int_in(1, MAX_CLOSE_WAIT_TIMEOUT),
        default=5,
        metavar="S",
        help="nf_conntrack_tcp_timeout_close_wait in the pods (default 5 s)",
    )
    up.add_argument(
        "--fin-wait-timeout",
        type=_int_in(1, MAX_CLOSE_WAIT_TIMEOUT),
        metavar="S",
        help="also set nf_conntrack_tcp_timeout_fin_wait in the pods (default: kernel's)",
    )
    up.add_argument(
        "--dual-stack",
        action="store_true",
        help="the proxy listens on [::] with IPV6_V6ONLY=0 (ambient's ztunnel always does)",
    )
    up.add_argument(
        "--pod-drop-invalid",
        action="store_true",
        help="Istio's DROP_INVALID in the pods (mangle PREROUTING ctstate INVALID DROP)",
    )
    up.add_argument(
        "--proxy-idle-timeout",
        type=_seconds,
        metavar="S",
        help="the sidecar closes connections idle this long (default: never, like a leak)",
    )
    up.set_defaults(func=_up)

    leak = sub.add_parser(
        "leak",
        help="form leaked pairs (and healthy traffic)",
        description="Form leaked pairs, and optionally healthy traffic, in a pod of a lab.",
    )
    _prefix(leak)
    leak.add_argument("--count", type=_int_in(0, MAX_COUNT), default=1, help="leaked pairs")
    leak.add_argument("--idle", type=_int_in(0, MAX_COUNT), default=0, help="idle connections")
    leak.add_argument(
        "--live", type=_int_in(0, MAX_COUNT), default=0, help="live half-closes (at-risk)"
    )
    leak.add_argument("--pod", type=_int_in(0, MAX_PODS - 1), default=0, help="pod index")
    leak.add_argument(
        "--inbound",
        action="store_true",
        help="inbound connections: clients outside the pod to its app port 8080",
    )
    _output(leak)
    leak.set_defaults(func=_leak)

    status = sub.add_parser("status", help="show a lab", description="Show what a lab holds.")
    _prefix(status)
    _output(status)
    status.set_defaults(func=_status)

    down = sub.add_parser("down", help="remove a lab", description="Remove everything of a lab.")
    _prefix(down)
    down.set_defaults(func=_down)


# -- commands ------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    settings = LabSettings(
        prefix=args.prefix,
        pods=args.pods,
        style=args.style,
        backend=args.backend,
        close_wait_timeout=args.close_wait_timeout,
        proxy_idle_timeout=args.proxy_idle_timeout,
        fin_wait_timeout=args.fin_wait_timeout,
        dual_stack=args.dual_stack,
        pod_drop_invalid=args.pod_drop_invalid,
    )
    lab = Lab(settings)
    started = time.monotonic()
    lab.up()
    out = sys.stdout
    mesh = settings.mesh
    print(
        f"lab {settings.prefix} is up in {time.monotonic() - started:.1f} s: {settings.style} "
        f"rules via {settings.backend}, conntrack close_wait timeout "
        f"{settings.close_wait_timeout} s in the pods",
        file=out,
    )
    print(
        f"  upstream  netns {lab.upstream_netns:<16} {lab.service}  pid {lab.upstream_pid}",
        file=out,
    )
    ports = "/".join(f":{p}" for p in mesh.listen_ports)
    stack = " dual-stack" if settings.listens_dual_stack else ""
    if lab.node_netns is not None:
        print(
            f"  ztunnel   netns {lab.node_netns:<16} pid {lab.proxy_pid(0)} (uid "
            f"{mesh.proxy_uid}, SO_MARK {hex(mesh.mark or 0)}), listening{stack} on {ports} "
            "inside every pod",
            file=out,
        )
    for pod in range(settings.pods)[:SHOWN_PODS]:
        who = "" if lab.node_netns else f" proxy pid {lab.proxy_pid(pod)} (uid {mesh.proxy_uid})"
        print(
            f"  pod {pod:<4}  netns {lab.pod_netns(pod):<16} {lab.pod_ip(pod):<17}{who} on "
            f"{ports}{stack}",
            file=out,
        )
    if settings.pods > SHOWN_PODS:
        print(f"  ... and {settings.pods - SHOWN_PODS} more pods", file=out)
    p = f" --prefix {settings.prefix}"
    print(
        f"next: halfclose lab leak{p} --count 3 --idle 2 --live 1\n"
        f"      halfclose scan --netns {lab.pod_netns(0)}\n"
        f"      halfclose lab down{p}",
        file=out,
    )
    return 0


def _leak(args: argparse.Namespace) -> int:
    if args.count + args.idle + args.live == 0:
        raise UserError("halfclose lab leak: nothing to do (--count, --idle and --live are all 0)")
    lab = Lab.attach(args.prefix)
    started = time.monotonic()
    inbound = args.inbound
    leaked = lab.leak(args.count, pod=args.pod, inbound=inbound) if args.count else []
    formed = time.monotonic() - started
    idle = lab.idle(args.idle, pod=args.pod, inbound=inbound) if args.idle else []
    live = lab.live_half_close(args.live, pod=args.pod, inbound=inbound) if args.live else []
    if args.output == "json":
        json.dump(
            {
                "prefix": args.prefix,
                "pod": args.pod,
                "netns": lab.pod_netns(args.pod),
                "leaked": [_pair_dict(p) for p in leaked],
                "idle": [_pair_dict(p) for p in idle],
                "live": [_pair_dict(p) for p in live],
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    out = sys.stdout
    where = f"pod {args.pod} (netns {lab.pod_netns(args.pod)})"
    if leaked:
        print(f"{where}: {len(leaked)} leaked pairs formed in {formed:.1f} s", file=out)
        _print_pairs(leaked, out)
    if idle:
        print(f"{where}: {len(idle)} idle connections held", file=out)
    if live:
        print(f"{where}: {len(live)} live half-closes held (the app keeps sending)", file=out)
    _print_pod_sockets(lab.pod_status(args.pod), out)
    print(f"classify them: halfclose scan --netns {lab.pod_netns(args.pod)}", file=out)
    return 0


def _status(args: argparse.Namespace) -> int:
    status = Lab(LabSettings(prefix=args.prefix)).status()
    if args.output == "json":
        json.dump(status.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    out = sys.stdout
    if not status.exists:
        print(f"no lab {status.prefix}", file=out)
        return 0
    if status.settings is None:
        print(
            f"lab {status.prefix}: no state, but namespaces {', '.join(status.stray_netns)} "
            f"exist: run `halfclose lab down --prefix {status.prefix}`",
            file=out,
        )
        return 0
    s = status.settings
    ports = status.capture_ports or ()
    print(
        f"lab {s.prefix}: {status.phase}; {s.style} rules via {s.backend}, capture ports "
        f"{'/'.join(map(str, ports))}",
        file=out,
    )
    up = status.upstream
    if up is not None:
        print(
            f"  upstream  netns {status.upstream_netns}  {SERVICE}  pid {up.pid} "
            f"{'alive' if up.alive else 'GONE'}",
            file=out,
        )
    rows = [
        ("pod", "netns", "ip", "close_wait", "proxy", "app", "ESTAB", "FIN-WAIT-2", "CLOSE-WAIT")
    ]
    for pod in status.pods:
        counts = Counter(v.state for v in pod.proxy_sockets)
        rows.append(
            (
                str(pod.index),
                pod.netns if pod.exists else f"{pod.netns} (GONE)",
                pod.ip,
                f"{pod.close_wait_timeout} s" if pod.close_wait_timeout is not None else "-",
                _proc(pod.proxy),
                _proc(pod.app),
                str(counts["ESTAB"]),
                str(counts["FIN-WAIT-2"]),
                str(counts["CLOSE-WAIT"]),
            )
        )
    _print_table(rows, out, indent="  ")
    print(
        "  (counts are the proxy's sockets; `halfclose scan` tells leaked from at-risk)", file=out
    )
    for pod in status.pods[:SHOWN_PODS]:
        _print_pod_sockets(pod, out)
    if status.stray_netns:
        print(f"stray namespaces (not in the state): {', '.join(status.stray_netns)}", file=out)
    return 0


def _down(args: argparse.Namespace) -> int:
    done = Lab(LabSettings(prefix=args.prefix)).down()
    if not done.anything:
        print(f"lab {args.prefix}: nothing to remove")
    else:
        print(
            f"lab {args.prefix} removed: {len(done.netns)} namespaces, "
            f"{len(done.processes)} processes, state dir"
            f"{'' if done.state_dir_removed else ' (none)'}"
        )
    return 0


# -- output ----------------------------------------------------------------------


def _pair_dict(pair: ProxiedPair) -> dict[str, str]:
    return {
        "app": str(pair.app),
        "proxy_downstream": str(pair.proxy_downstream),
        "proxy_upstream": str(pair.proxy_upstream),
    }


def _print_pairs(pairs: Sequence[ProxiedPair], out: TextIO) -> None:
    rows = [("app", "proxy downstream", "proxy upstream")]
    rows += [(str(p.app), str(p.proxy_downstream), str(p.proxy_upstream)) for p in pairs]
    _print_table(rows[: SHOWN_ROWS + 1], out, indent="  ")
    if len(pairs) > SHOWN_ROWS:
        print(f"  ... and {len(pairs) - SHOWN_ROWS} more", file=out)


def _print_pod_sockets(pod: PodStatus, out: TextIO) -> None:
    if not pod.exists:
        return
    views = pod.proxy_sockets
    print(f"proxy sockets in {pod.netns} (ss -tanp, LISTEN omitted): {len(views)}", file=out)
    rows = [("State", "Local", "Peer", "Process")]
    rows += [
        (v.state, v.local, v.peer, f"{v.process} pid {v.pid}" if v.process else "-")
        for v in views[:SHOWN_ROWS]
    ]
    _print_table(rows, out, indent="  ")
    if len(views) > SHOWN_ROWS:
        print(f"  ... and {len(views) - SHOWN_ROWS} more", file=out)


def _print_table(rows: Sequence[Sequence[str]], out: TextIO, indent: str = "") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def _proc(info: Any) -> str:
    if info is None:
        return "-"
    uid = f" uid {info.uid}" if info.uid is not None else ""
    return f"{info.pid}{uid}" if info.alive else f"{info.pid} GONE"


# -- argument types ----------------------------------------------------------------


def _prefix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix",
        type=_checked(validate_prefix),
        default=DEFAULT_PREFIX,
        help=f"lab name; netns are <prefix>-up, <prefix>-pod<i> (default {DEFAULT_PREFIX})",
    )


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=("table", "json"), default="table")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} out of range {low}..{high}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{value:g} out of range (0, 86400]")
    return value


def _checked(validate: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return validate(text)
        except LabError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse
