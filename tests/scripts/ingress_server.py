#!/usr/bin/env python3
"""A service task for the routing-mesh tests: on TCP and UDP PORT it answers
"<task name> <client address>" (the peer its socket sees), so a client knows which task it
reached and the test knows whether the client's address survived the mesh. TCP: the line
on connect, then "<name> <line>" for every line received (a held connection can be checked
later). On SIGTERM it stops accepting and serves established connections 8 s more."""
import os, signal, socket, sys, threading, time

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
name = os.environ.get("SWARMNET_TASK_NAME", "?")
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port))
tcp.listen(512)
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
        udp.sendto(("%s %s" % (name, peer[0])).encode(), peer)


def serve(conn, peer):
    try:
        conn.sendall(("%s %s\n" % (name, peer[0])).encode())
        for line in conn.makefile("rb"):
            conn.sendall(name.encode() + b" " + line)
    except OSError:
        pass
    finally:
        conn.close()


threading.Thread(target=serve_udp, daemon=True).start()
while not stopping.is_set():
    try:
        conn, peer = tcp.accept()
    except OSError:
        break
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
time.sleep(8)
