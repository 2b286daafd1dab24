"""A quick iperf-like transfer between two sites with plain sockets, for ``cluster status``.

The sink accepts one connection, reads the announced number of bytes and answers one byte;
the source times from connect to that answer, so the rate includes the whole transfer
through the shaped queue, not just handing bytes to the local socket buffer.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence

__all__ = ["sink", "source", "main"]

_CHUNK = 1 << 16


def sink(host: str, port: int) -> None:
    with socket.create_server((host, port), reuse_port=False) as server:
        print("ready", flush=True)
        server.settimeout(60)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(60)
            (total,) = struct.unpack("!Q", _read_exactly(conn, 8))
            received = 0
            while received < total:
                data = conn.recv(min(_CHUNK * 16, total - received))
                if not data:
                    raise ConnectionError(f"source closed after {received} of {total} bytes")
                received += len(data)
            conn.sendall(b"k")


def source(host: str, port: int, nbytes: int) -> dict[str, float]:
    payload = b"\0" * _CHUNK
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.sendall(struct.pack("!Q", nbytes))
        left = nbytes
        while left > 0:
            n = min(left, _CHUNK)
            conn.sendall(payload[:n])
            left -= n
        _read_exactly(conn, 1)
    seconds = time.perf_counter() - start
    return {"bytes": nbytes, "seconds": seconds, "rate_bps": nbytes * 8 / seconds}


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise ConnectionError("peer closed the connection early")
        data += part
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamddp.emulation.linkprobe")
    parser.add_argument("role", choices=["sink", "source"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=29499)
    parser.add_argument("--bytes", type=int, default=10 * 2**20)
    args = parser.parse_args(argv)
    if args.role == "sink":
        sink(args.host, args.port)
    else:
        print(json.dumps(source(args.host, args.port, args.bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
