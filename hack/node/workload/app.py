"""The meshed app: `python3 app.py leak N HOLD` opens N connections to
$UPSTREAM (host:port; the pod's NAT rules redirect them to the sidecar on
:15001), reads each until the upstream's half-close arrives, waits HOLD
seconds (longer than the pod netns's nf_conntrack_tcp_timeout_close_wait, so
the NAT entry has expired) and only then closes: that late FIN is not NATed,
never reaches the sidecar, and the sidecar's FIN_WAIT2 + CLOSE_WAIT sockets
leak (the lab's recipe). Without arguments: one round of 5, then sleeps."""

import os
import socket
import sys
import time


def leak(n: int, hold: float) -> None:
    host, port = os.environ["UPSTREAM"].rsplit(":", 1)
    socks = []
    for _ in range(n):
        for attempt in range(60):  # the sidecar may still be starting
            try:
                s = socket.create_connection((host, int(port)), timeout=10)
                break
            except OSError:
                if attempt == 59:
                    raise
                time.sleep(0.5)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        socks.append(s)
    print(f"app: {n} connections half-closed by the upstream; closing in {hold}s", flush=True)
    time.sleep(hold)
    for s in socks:
        s.close()
    print(f"app: closed {n} connections late", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "leak":
        leak(int(sys.argv[2]), float(sys.argv[3]))
        return
    leak(5, float(os.environ.get("HOLD", "12")))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
