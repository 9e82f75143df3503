"""What a hostile client needs against a real cluster (tests/serving/test_hostile_clients.py):
the TCP sockets a process listens on (read from /proc, no psutil), the processes a launcher
started, raw gRPC calls carrying bytes no well-behaved client would send, a plain HTTP client
that reads error bodies, and a bait listener that records whether anyone dialled it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import urllib.error
import urllib.request
from pathlib import Path

import grpc

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6}'s local address: host-order 32-bit words (little-endian here)."""
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_sockets(pid: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every TCP socket process `pid` holds in the LISTEN state."""
    mine = socket_inodes(pid)
    out = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == _LISTEN and inode in mine:
                ip, port = local.split(":")
                out.append((_address(ip), int(port, 16)))
    return sorted(out, key=lambda a: (a[1], str(a[0])))


def is_loopback(address) -> bool:
    """127.0.0.0/8 and ::1, also as an IPv4-mapped IPv6 address (gRPC binds 127.0.0.1 that way)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return sorted(out)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (string, bytes or message) built by hand: nothing checks
    that a string is UTF-8 or that a message parses."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def raw_call(channel: grpc.Channel, method: str, payload: bytes, *, streaming: bool = False, timeout: float = 10.0):
    """Call `method` ("/pkg.Service/Method") with raw bytes as the request; the responses as bytes."""
    if streaming:
        return list(channel.unary_stream(method)(payload, timeout=timeout))
    return channel.unary_unary(method)(payload, timeout=timeout)


def http(base: str, path: str, body: bytes | dict | None = None, *, timeout: float = 30.0) -> tuple[int, dict | str]:
    """(status, JSON body or text) of a GET (no body) or POST to an HTTP front; errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class Bait:
    """A loopback listener nobody should dial: a stranger's address in forged messages. `dialled`
    tells whether any connection reached it (one would carry the cluster's credentials)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0

    def dialled(self) -> bool:
        while select.select([self.sock], [], [], 0)[0]:
            conn, _ = self.sock.accept()
            conn.close()
            self.connections += 1
        return self.connections > 0

    def close(self) -> None:
        self.sock.close()
