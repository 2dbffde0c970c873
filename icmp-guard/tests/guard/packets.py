#!/usr/bin/python3
"""Packets the guard tests send with scapy (Debian python3-scapy), from a peer namespace.

usage: packets.py IFACE DST_MAC KIND ARGS...

  malformed SRC DST        four malformed or truncated ICMP frames (see below); prints the count
  fragments SRC DST        one 3000-byte echo request in IPv4 fragments; prints the count
  ns SRC DST               a neighbour solicitation for DST (hop limit 255); exits 0 when a
                           neighbour advertisement for DST comes back
  error SRC DST INNER_SRC INNER_DST SPORT DPORT
                           an ICMP port-unreachable from SRC whose inner header is the UDP
                           packet INNER_SRC:SPORT -> INNER_DST:DPORT
"""
import sys

from scapy.all import (ICMP, IP, UDP, Ether, ICMPv6ND_NA, ICMPv6ND_NS,
                       ICMPv6NDOptSrcLLAddr, IPv6, Raw, conf, fragment,
                       get_if_hwaddr, in6_getnsma, in6_getnsmac, inet_pton,
                       sendp, srp1)

conf.verb = 0


def main():
    iface, dst_mac, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    args = sys.argv[4:]
    eth = Ether(dst=dst_mac, src=get_if_hwaddr(iface))
    if kind == "malformed":
        src, dst = args
        frames = [
            # The ICMP header cut to 4 bytes (IP length agrees).
            eth / IP(src=src, dst=dst, proto=1, len=24) / Raw(b"\x08\x00\x00\x00"),
            # The IP header claims 84 bytes; the frame carries 28.
            eth / IP(src=src, dst=dst, proto=1, len=84) / Raw(b"\x08\x00\xf7\xff\x00\x00\x00\x00"),
            # IHL 4: shorter than an IPv4 header can be.
            eth / IP(src=src, dst=dst, proto=1, ihl=4) / ICMP(),
            # The IP length is shorter than an ICMP header.
            eth / IP(src=src, dst=dst, proto=1, len=22) / ICMP(),
        ]
        for f in frames:
            sendp(f, iface=iface)
        print(len(frames))
    elif kind == "fragments":
        src, dst = args
        frags = fragment(IP(src=src, dst=dst) / ICMP(id=0x4242) / Raw(b"P" * 3000), fragsize=1000)
        for f in frags:
            sendp(eth / f, iface=iface)
        print(len(frags))
    elif kind == "ns":
        src, dst = args
        nsma = in6_getnsma(inet_pton(10, dst))
        mac = in6_getnsmac(nsma)
        req = (Ether(dst=mac, src=get_if_hwaddr(iface))
               / IPv6(src=src, dst=inet_ntop6(nsma), hlim=255)
               / ICMPv6ND_NS(tgt=dst) / ICMPv6NDOptSrcLLAddr(lladdr=get_if_hwaddr(iface)))
        ans = srp1(req, iface=iface, timeout=3)
        ok = ans is not None and ICMPv6ND_NA in ans and ans[ICMPv6ND_NA].tgt == dst
        sys.exit(0 if ok else 3)
    elif kind == "error":
        src, dst, isrc, idst, sport, dport = args
        inner = IP(src=isrc, dst=idst) / UDP(sport=int(sport), dport=int(dport))
        sendp(eth / IP(src=src, dst=dst) / ICMP(type=3, code=3) / bytes(inner)[:28], iface=iface)
        print(1)
    else:
        sys.exit("unknown kind " + kind)


def inet_ntop6(b):
    import socket
    return socket.inet_ntop(socket.AF_INET6, b)


if __name__ == "__main__":
    main()
