#!/usr/bin/env python3
"""Captures, on interface IFACE (run inside the namespace that has it), the payload of every
IPv4 UDP and TCP packet to or from PORT for SECONDS, and writes them to OUT one after the
other, and the first UDP payload of 60 bytes or more to OUT.first (to be replayed); prints
how many packets it kept."""
import socket, struct, sys, time

iface, port, seconds, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
s.bind((iface, 0))
s.settimeout(0.2)
end = time.time() + seconds
kept = 0
first = None
with open(out, "wb") as f:
    while time.time() < end:
        try:
            frame = s.recv(65535)
        except socket.timeout:
            continue
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        l4 = 14 + ihl
        if proto == 17 and len(frame) >= l4 + 8:
            sport, dport = struct.unpack("!HH", frame[l4:l4 + 4])
            payload = frame[l4 + 8:]
        elif proto == 6 and len(frame) >= l4 + 20:
            sport, dport = struct.unpack("!HH", frame[l4:l4 + 4])
            payload = frame[l4 + ((frame[l4 + 12] >> 4) * 4):]
        else:
            continue
        if port in (sport, dport) and payload:
            f.write(payload)
            kept += 1
            if first is None and proto == 17 and len(payload) >= 60:
                first = payload
if first is not None:
    with open(out + ".first", "wb") as f:
        f.write(first)
print(kept)
