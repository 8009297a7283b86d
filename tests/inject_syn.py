#!/usr/bin/env python3
"""Test helper: sends one TCP SYN as a raw Ethernet frame out of IFACE
(from SRC_IP to DST_IP:PORT, to DST_MAC) and prints ANSWERED if any TCP
segment from that port comes back on IFACE (four tries, 0.7 s each), else SILENT.
Used by tests/e2e_loopback.rs to play a guest that crafts packets."""
import socket, struct, sys, time

iface, dst_mac, src, dst, port = sys.argv[1:6]
port = int(port)
SRC_MAC = bytes.fromhex("02006c756d65")


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


tcp = struct.pack("!HHIIBBHHH", 40123, port, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
ph = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
tcp = tcp[:16] + struct.pack("!H", csum(ph + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex(dst_mac.replace(":", "")) + SRC_MAC + b"\x08\x00" + ip + tcp

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((iface, 0))
s.settimeout(0.2)
# A few tries: a veth that has just come up may drop the first frame.
for attempt in range(4):
    s.send(frame)
    until = time.time() + 0.7
    while time.time() < until:
        try:
            f = s.recv(65535)
        except socket.timeout:
            continue
        if len(f) >= 38 and f[12:14] == b"\x08\x00" and f[23] == 6:
            ihl = (f[14] & 15) * 4
            sport = struct.unpack("!H", f[14 + ihl:16 + ihl])[0]
            if sport == port:
                print("ANSWERED")
                sys.exit(0)
print("SILENT")
