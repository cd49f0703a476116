#!/usr/bin/env python3
"""Sends the bytes of FILE as one UDP datagram to ADDR:PORT."""
import socket, sys

addr, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(open(path, "rb").read(), (addr, port))
