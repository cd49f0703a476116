#!/usr/bin/env python3
"""The load-balancer tests' client; it runs as a task (`swarmnet run`), so its sockets are
the ones the load balancer translates. Prints one JSON object.

  tcp VIP PORT N        N new TCP connections: which task answered each, and whether
                        getpeername() showed VIP:PORT every time
  udp VIP PORT N        N new UDP flows (a new unconnected socket each, sendto/recvfrom):
                        which task answered, and whether every reply came from VIP:PORT
  udp-connected VIP PORT  a connected UDP socket: send, recv, getpeername
  refused VIP PORT      connect() and sendto() to a VIP with no task: the errors and how
                        long connect() took
  reach ADDR PORT       one TCP connect with a 2 s timeout: reached (and whom) or the error
  loop VIP PORT FILE    new connections until FILE.stop exists; counts in FILE (ok, failed),
                        the first 100 failures in FILE.errors (time, why)
  udp-hold VIP PORT WANT DIR  the same with a connected UDP socket; after DIR/go, the
                        reply or the error its next send/recv gives
  on-demand VIP PORT N DIR  a task that stays: for k = 1, 2, ... waits for DIR/go<k>, makes N
                        new TCP connections (as `tcp`) and writes the result to DIR/result<k>
  hold VIP PORT WANT DIR  connects until task WANT answers and keeps that connection;
                        writes DIR/held, waits for DIR/go, then checks the held connection
                        still answers and makes 60 new connections; result in DIR/result
"""
import errno, json, os, socket, sys, time


def name_of(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def tcp(vip, port, n):
    counts, bad_peer, errors = {}, [], []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((vip, port))
            peer = s.getpeername()
            if peer != (vip, port):
                bad_peer.append(list(peer))
            who = name_of(s)
            counts[who] = counts.get(who, 0) + 1
        except OSError as e:
            errors.append(str(e))
        finally:
            s.close()
    return {"counts": counts, "bad_peer": bad_peer, "errors": errors}


def udp(vip, port, n):
    counts, bad_source, errors = {}, [], []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        try:
            s.sendto(b"flow%d" % i, (vip, port))
            data, src = s.recvfrom(2048)
            if src != (vip, port):
                bad_source.append(list(src))
            who = data.decode().split()[0]
            counts[who] = counts.get(who, 0) + 1
            # A second datagram of the same flow goes to the same task.
            s.sendto(b"again", (vip, port))
            data2, _ = s.recvfrom(2048)
            if data2.decode().split()[0] != who:
                errors.append("flow %d moved from %s to %s" % (i, who, data2.decode()))
        except OSError as e:
            errors.append(str(e))
        finally:
            s.close()
    return {"counts": counts, "bad_source": bad_source, "errors": errors}


def udp_connected(vip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((vip, port))
    s.send(b"hello")
    data = s.recv(2048)
    return {"reply": data.decode(), "peer": list(s.getpeername())}


def refused(vip, port):
    out = {}
    s = socket.socket()
    s.settimeout(5)
    t = time.monotonic()
    try:
        s.connect((vip, port))
        out["tcp"] = "connected"
    except OSError as e:
        out["tcp"] = errno.errorcode.get(e.errno, str(e))
    out["tcp_ms"] = (time.monotonic() - t) * 1000
    s.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"x", (vip, port))
        out["udp"] = "sent"
    except OSError as e:
        out["udp"] = errno.errorcode.get(e.errno, str(e))
    # A connected socket also hears an ICMP refusal: the first error of connect/send/recv.
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)
    try:
        c.connect((vip, port))
        c.send(b"x")
        c.recv(2048)
        out["udp_connected"] = "answered"
    except OSError as e:
        out["udp_connected"] = errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)
    return out


def reach(addr, port):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((addr, port))
        return {"reached": name_of(s)}
    except OSError as e:
        return {"error": errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)}


def loop(vip, port, path):
    ok = failed = 0
    while not os.path.exists(path + ".stop"):
        s = socket.socket()
        s.settimeout(3)
        why = None
        try:
            s.connect((vip, port))
            if name_of(s):
                ok += 1
            else:
                why = "closed without an answer"
        except OSError as e:
            why = str(e)
        finally:
            s.close()
        if why is not None:
            failed += 1
            if failed <= 100:
                # The first failures, for the test's message: when and why.
                with open(path + ".errors", "a") as f:
                    f.write("%.3f %s\n" % (time.time(), why))
        with open(path + ".tmp", "w") as f:
            f.write("%d %d" % (ok, failed))
        os.replace(path + ".tmp", path)
        time.sleep(0.02)
    return {"ok": ok, "failed": failed}


def hold(vip, port, want, d):
    for _ in range(200):
        s = socket.socket()
        s.settimeout(5)
        s.connect((vip, port))
        if name_of(s) == want:
            break
        s.close()
    else:
        return {"error": "never reached " + want}
    open(os.path.join(d, "held"), "w").close()
    while not os.path.exists(os.path.join(d, "go")):
        time.sleep(0.02)
    t = time.monotonic()
    try:
        s.sendall(b"still\n")
        held = name_of(s)
    except OSError as e:
        held = "error: " + str(e)
    new = tcp(vip, port, 60)
    result = {"held_reply": held, "new": new, "held_checked_after_ms": (time.monotonic() - t) * 1000}
    with open(os.path.join(d, "result.tmp"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(d, "result.tmp"), os.path.join(d, "result"))
    return result


def udp_hold(vip, port, want, d):
    """A connected UDP socket that reached task WANT; after DIR/go, what using it gives."""
    lost = 0
    for _ in range(200):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((vip, port))
        s.send(b"who")
        try:
            if s.recv(2048).decode().split()[0] == want:
                break
        except socket.timeout:
            # UDP may lose a datagram (the first one over a path not yet resolved): a new
            # flow, not a failure of what this mode checks.
            lost += 1
        s.close()
    else:
        result = {"error": "never reached %s (%d datagrams unanswered)" % (want, lost)}
        with open(os.path.join(d, "result"), "w") as f:
            json.dump(result, f)
        return result
    open(os.path.join(d, "held"), "w").close()
    while not os.path.exists(os.path.join(d, "go")):
        time.sleep(0.02)
    try:
        s.send(b"still")
        result = {"reply": s.recv(2048).decode()}
    except OSError as e:
        result = {"error": errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)}
    result["unanswered_before_held"] = lost
    with open(os.path.join(d, "result.tmp"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(d, "result.tmp"), os.path.join(d, "result"))
    return result


def on_demand(vip, port, n, d):
    k = 1
    while True:
        while not os.path.exists(os.path.join(d, "go%d" % k)):
            time.sleep(0.05)
        r = tcp(vip, port, n)
        with open(os.path.join(d, "result%d.tmp" % k), "w") as f:
            json.dump(r, f)
        os.replace(os.path.join(d, "result%d.tmp" % k), os.path.join(d, "result%d" % k))
        k += 1


def main():
    mode, a = sys.argv[1], sys.argv[2:]
    if mode == "tcp":
        r = tcp(a[0], int(a[1]), int(a[2]))
    elif mode == "udp":
        r = udp(a[0], int(a[1]), int(a[2]))
    elif mode == "udp-connected":
        r = udp_connected(a[0], int(a[1]))
    elif mode == "refused":
        r = refused(a[0], int(a[1]))
    elif mode == "reach":
        r = reach(a[0], int(a[1]))
    elif mode == "loop":
        r = loop(a[0], int(a[1]), a[2])
    elif mode == "hold":
        r = hold(a[0], int(a[1]), a[2], a[3])
    elif mode == "on-demand":
        r = on_demand(a[0], int(a[1]), int(a[2]), a[3])
    elif mode == "udp-hold":
        r = udp_hold(a[0], int(a[1]), a[2], a[3])
    else:
        raise SystemExit("unknown mode " + mode)
    print(json.dumps(r))


main()
