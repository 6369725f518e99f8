"""A null HTTP endpoint: answers every request at once with 200 and a tiny body.

The open-loop generator is measured against it (its capacity on this machine) before it is trusted
with a real server, and the generator benchmark uses it. Run as ``python -m
optiserve.loadtests.null_server PORT [STALL_AFTER_S STALL_S]`` (prints ``ready`` once it listens).
With a stall, the server stops answering for STALL_S seconds, STALL_AFTER_S seconds after its first
request, then answers everything it held back: the coordinated-omission test's "slow window".
"""

from __future__ import annotations

import asyncio
import sys
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


STALL: list[float] = []  # [stall_after_s, stall_s] when asked for
FIRST_REQUEST: list[float] = []


def _stall_remaining() -> float:
    if not STALL:
        return 0.0
    now = time.monotonic()
    if not FIRST_REQUEST:
        FIRST_REQUEST.append(now)
    begin = FIRST_REQUEST[0] + STALL[0]
    return max(0.0, begin + STALL[1] - now) if now >= begin else 0.0


class NullProtocol(asyncio.Protocol):
    """Parses just enough HTTP/1.1 (request line, headers, Content-Length body) to answer each request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                break
            self.buffer = self.buffer[total:]
            out.append(RESPONSE)
        if out:
            wait = _stall_remaining()
            data = b"".join(out)
            if wait > 0:
                asyncio.get_running_loop().call_later(wait, self.transport.write, data)
            else:
                self.transport.write(data)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(NullProtocol, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) == 4:
        STALL.extend([float(sys.argv[2]), float(sys.argv[3])])
    asyncio.run(serve(int(sys.argv[1])))
