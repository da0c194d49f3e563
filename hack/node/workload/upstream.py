"""The upstream pod: answers each connection with one line, then half-closes
(shutdown(SHUT_WR): the FIN the sidecar forwards to the app) and waits for the
peer's own close. Port from $PORT (8080)."""

import os
import socket
import threading


def serve(conn: socket.socket) -> None:
    with conn:
        conn.sendall(b"hello\n")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    srv = socket.create_server(("0.0.0.0", port), backlog=128)  # noqa: S104 - the pod's address
    print("upstream: listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
