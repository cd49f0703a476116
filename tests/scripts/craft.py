#!/usr/bin/env python3
"""Hostile packets for the routing-mesh tests (raw sockets; run on the outside client's
namespace). Prints one JSON object with what was sent.

  invalid SRC DST SPORT DPORT  segments of the connection SRC:SPORT -> DST:DPORT that are
                               out of its window: ACKs with random numbers, RSTs and FINs
                               far from the expected sequence, SYN+FIN, each with garbage
  scan SRC DST PORT            a SYN scan of DST (ports 1-1024 and PORT-50..PORT+50 from
                               random source ports), and garbage UDP datagrams to DST:PORT
"""
import json, os, random, socket, struct, sys

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def segment(src, dst, sport, dport, seq, ack, flags, payload=b""):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr) + len(payload))
    c = csum(pseudo + hdr + payload)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:] + payload


def main():
    cmd = sys.argv[1]
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    sent = 0
    if cmd == "invalid":
        src, dst, sport, dport = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        r = lambda: random.getrandbits(32)
        for flags, n in ((ACK, 40), (RST, 10), (RST | ACK, 10), (FIN | ACK, 10), (SYN | FIN, 5), (PSH | ACK, 10)):
            for _ in range(n):
                raw.sendto(segment(src, dst, sport, dport, r(), r(), flags, os.urandom(random.randint(0, 200))), (dst, 0))
                sent += 1
    elif cmd == "scan":
        src, dst, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
        for p in list(range(1, 1025)) + list(range(max(1, port - 50), min(65535, port + 50))):
            raw.sendto(segment(src, dst, random.randint(20000, 60000), p, random.getrandbits(32), 0, SYN), (dst, 0))
            sent += 1
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(200):
            u.sendto(os.urandom(random.randint(0, 1400)), (dst, port))
            sent += 1
    else:
        raise SystemExit("unknown command %s" % cmd)
    print(json.dumps({"sent": sent}))


main()
