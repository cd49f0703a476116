#!/usr/bin/env python3
"""The routing-mesh tests' client, run on the outside client's namespace (or a node's).
Prints one JSON object.

  tcp ADDR PORT N     N new TCP connections: which task answered each ("counts") and the
                      client address each task saw ("peers")
  udp ADDR PORT N     N new UDP flows (a new socket each): the same, and whether every
                      reply came from ADDR:PORT
  reach ADDR PORT     one TCP connection with a 2 s timeout: who answered, or the error
  hold ADDR PORT WANT DIR  connects until task WANT answers and keeps that connection:
                      writes DIR/held ("<task> <local port>"), waits for DIR/go, then sends
                      a line on it; DIR/result says whether the same task still answers on it
"""
import json, os, socket, sys, time


def line_of(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def tcp(addr, port, n):
    counts, peers, errors = {}, {}, []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((addr, port))
            who, _, peer = line_of(s).partition(" ")
            counts[who] = counts.get(who, 0) + 1
            peers[peer] = peers.get(peer, 0) + 1
        except OSError as e:
            errors.append(str(e))
        finally:
            s.close()
    return {"counts": counts, "peers": peers, "errors": errors}


def udp(addr, port, n):
    counts, peers, errors, bad_source = {}, {}, [], []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        try:
            s.sendto(b"flow%d" % i, (addr, port))
            data, src = s.recvfrom(2048)
            if src != (addr, port):
                bad_source.append(list(src))
            who, _, peer = data.decode().partition(" ")
            counts[who] = counts.get(who, 0) + 1
            peers[peer] = peers.get(peer, 0) + 1
        except OSError as e:
            errors.append(str(e))
        finally:
            s.close()
    return {"counts": counts, "peers": peers, "errors": errors, "bad_source": bad_source}


def reach(addr, port):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((addr, port))
        who, _, peer = line_of(s).partition(" ")
        return {"reached": who, "peer": peer}
    except OSError as e:
        return {"error": str(e)}
    finally:
        s.close()


def hold(addr, port, want, d):
    for _ in range(200):
        s = socket.socket()
        s.settimeout(5)
        s.connect((addr, port))
        who, _, _ = line_of(s).partition(" ")
        if who == want:
            break
        s.close()
    else:
        raise SystemExit("task %s never answered" % want)
    with open(os.path.join(d, "held.tmp"), "w") as f:
        f.write("%s %d" % (who, s.getsockname()[1]))
    os.rename(os.path.join(d, "held.tmp"), os.path.join(d, "held"))
    while not os.path.exists(os.path.join(d, "go")):
        time.sleep(0.05)
    try:
        s.sendall(b"still\n")
        got = line_of(s)
        ok = got == who + " still"
        res = {"held": who, "answer": got, "ok": ok}
    except OSError as e:
        res = {"held": who, "error": str(e), "ok": False}
    with open(os.path.join(d, "result"), "w") as f:
        json.dump(res, f)
    return res


def main():
    cmd, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if cmd == "tcp":
        out = tcp(addr, port, int(sys.argv[4]))
    elif cmd == "udp":
        out = udp(addr, port, int(sys.argv[4]))
    elif cmd == "reach":
        out = reach(addr, port)
    elif cmd == "hold":
        out = hold(addr, port, sys.argv[4], sys.argv[5])
    else:
        raise SystemExit("unknown command " + cmd)
    print(json.dumps(out))


main()
