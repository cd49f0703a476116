#!/usr/bin/env python3
"""A service task for the load-balancer tests: on TCP and UDP PORT it answers with its task
name, so a client knows which task it reached. TCP: the name on connect, then
"<name> <line>" for every line received. UDP: "<name> <datagram>". On SIGTERM it stops
accepting but serves its established connections for 8 more seconds (the agent turns the
endpoint draining before it signals, and gives 10 s before SIGKILL)."""
import os, signal, socket, sys, threading, time

port = int(sys.argv[1]) if len(sys.argv) > 1 else 7000
name = os.environ.get("SWARMNET_TASK_NAME", "?").encode()
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port))
tcp.listen(512)
# A second TCP port (PORT + 1), answering the same way: a VIP forwards every port.
other = socket.socket()
other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
other.bind(("0.0.0.0", port + 1))
other.listen(64)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
stopping = threading.Event()


def on_term(*_):
    stopping.set()
    try:
        tcp.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


signal.signal(signal.SIGTERM, on_term)


def serve_udp():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(name + b" " + data, peer)


def serve(conn):
    try:
        conn.sendall(name + b"\n")
        for line in conn.makefile("rb"):
            conn.sendall(name + b" " + line)
    except OSError:
        pass
    finally:
        conn.close()


def serve_other():
    while True:
        conn, _ = other.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


threading.Thread(target=serve_udp, daemon=True).start()
threading.Thread(target=serve_other, daemon=True).start()
while not stopping.is_set():
    try:
        conn, _ = tcp.accept()
    except OSError:
        break
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
time.sleep(8)
