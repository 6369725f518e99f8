"""The open-loop load generator: requests leave on a schedule, whether or not earlier ones have returned.

Locust's users are closed loops (a user waits for its answer before the next send, and its
"constant throughput" wait times are counted from that answer), so a slow server quietly lowers the
offered load and hides its own queueing: coordinated omission. Here the send times are fixed in
advance (evenly spaced, or a Poisson process) and every latency is measured from the **scheduled** send
time, so time spent waiting for a free connection or in the server's queue is counted. A send that
leaves more than 1 ms after its scheduled time is *late*; the late fraction says how far the generator
itself could be trusted.

One process, asyncio protocols over a pool of keep-alive HTTP/1.1 connections (at most ``users`` in
flight). Run by :mod:`optiserve.loadtests.runner` as
``python -m optiserve.loadtests.openloop --spec spec.json`` and writes raw samples
``start_s,latency_ms,ok,error,late_ms`` (start_s = scheduled send, epoch seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

LATE_S = 0.001


def send_times(segments: list[tuple[float, float]], arrival: str, seed: int = 0) -> np.ndarray:
    """Offsets (s) of every send for (seconds, rate) segments: evenly spaced or Poisson."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    t0 = 0.0
    for seconds, rate in segments:
        n = max(0, round(seconds * rate))
        if n and rate > 0:
            if arrival == "poisson":
                # A Poisson process given its count: n arrival times uniform over the segment, sorted
                # (exponential gaps, CV 1). Drawing the gaps instead left the count to chance, and with
                # one seed for every level the same draw ran ~10% short at every rate of a search.
                times = np.sort(rng.uniform(0.0, seconds, size=n))
            else:
                times = np.arange(n) / rate
            out.append(t0 + times)
        t0 += seconds
    return np.concatenate(out) if out else np.zeros(0)


EARLY_WAKE_S = 0.002
SPIN = [0.0]  # seconds spent waiting actively for a send time (not work): excluded from the CPU figure


async def _until(loop: asyncio.AbstractEventLoop, due: float) -> None:
    """Wait until ``due`` (loop time) without overshooting it.

    Sleeping right up to a send time overshoots it: asyncio rounds its epoll timeout *up* to whole
    milliseconds, and a virtual CPU woken from idle can take another 0.5-1 ms; at 100 req/s that made a
    fifth of the sends more than 1 ms late. So sleep until 2 ms before (in whole milliseconds), then
    yield to the loop (which keeps reading responses) until the send time. That active wait costs CPU
    time that is not load generation; it is counted separately (``SPIN``) so the generator's CPU
    check measures work, not waiting.
    """
    delay = due - loop.time() - EARLY_WAKE_S
    if delay >= 0.001:
        await asyncio.sleep(math.floor(delay * 1000) / 1000)
    started = loop.time()
    while loop.time() < due:
        await asyncio.sleep(0)
    SPIN[0] += loop.time() - started


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, on_done: collections.abc.Callable[[Connection, int, str], None]) -> None:
        self.on_done = on_done
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> None:
        self.busy = True
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].split(b"\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        status = int(head[0].split()[1])
        self.busy = False
        self.on_done(self, status, "" if status == 200 else f"http-{status}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:
            self.busy = False
            self.on_done(self, 0, "ConnectionError")


@dataclass
class Record:
    scheduled: float
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    error: str = ""


class Generator:
    def __init__(self, host: str, port: int, requests: list[bytes], users: int) -> None:
        self.host, self.port = host, port
        self.requests = requests
        self.users = users
        self.idle: collections.deque[Connection] = collections.deque()
        self.open = 0
        self.free = asyncio.Event()
        self.current: dict[int, Record] = {}
        self.records: list[Record] = []

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        self.open += 1
        try:
            _, conn = await loop.create_connection(lambda: Connection(self._done), self.host, self.port)
        except OSError:
            self.open -= 1
            raise
        return conn

    def _done(self, conn: Connection, status: int, error: str) -> None:
        record = self.current.pop(id(conn))
        record.done = asyncio.get_running_loop().time()
        record.status, record.error = status, error
        if conn.transport is not None:
            self.idle.append(conn)
        else:
            self.open -= 1
        self.free.set()

    async def _connection(self) -> Connection:
        while True:
            while self.idle:
                conn = self.idle.popleft()
                if conn.transport is not None:
                    return conn
                self.open -= 1
            if self.open < self.users:
                return await self._connect()
            self.free.clear()
            await self.free.wait()

    async def run(self, offsets: np.ndarray) -> float:
        """Send on schedule; returns the loop time of the first scheduled send."""
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        n_payloads = len(self.requests)
        for i, offset in enumerate(offsets.tolist()):
            due = start + offset
            await _until(loop, due)
            record = Record(scheduled=due)
            self.records.append(record)
            try:
                conn = await self._connection()
            except OSError as e:
                record.sent = record.done = loop.time()
                record.error = type(e).__name__
                continue
            record.sent = loop.time()
            self.current[id(conn)] = record
            conn.send(self.requests[i % n_payloads])
        deadline = loop.time() + 60
        while self.current and loop.time() < deadline:
            self.free.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.free.wait(), timeout=1.0)
        for record in self.current.values():
            record.error = record.error or "Timeout"
        return start


def http_request(host: str, path: str, body: bytes, header_length: int | None) -> bytes:
    """One POST; ``header_length`` None: a plain-JSON request, else the binary tensor extension."""
    kind = (
        "Content-Type: application/json\r\n"
        if header_length is None
        else f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_length}\r\n"
    )
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{kind}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def main() -> int:
    parser = argparse.ArgumentParser(description="open-loop load generator (run by optiserve)")
    parser.add_argument("--spec", required=True, help="JSON: host, port, path, payloads, samples, ...")
    args = parser.parse_args()
    with open(args.spec) as spec_file:
        spec = json.load(spec_file)
    with open(spec["payloads"], "rb") as payload_file:
        records = [json.loads(line) for line in payload_file.read().splitlines() if line.strip()]
    requests = [
        http_request(spec["host"], spec["path"], base64.b64decode(r["body"]), r["header_length"])
        for r in records
    ]
    offsets = send_times(
        [tuple(s) for s in spec["segments"]], spec.get("arrival", "constant"), spec.get("seed", 0)
    )
    generator = Generator(spec["host"], spec["port"], requests, spec["users"])
    epoch_minus_loop = time.time() - time.monotonic()

    async def go() -> None:
        await generator.run(offsets)

    cpu_before, wall_before = time.process_time(), time.monotonic()
    asyncio.run(go())
    cpu_s, wall_s = time.process_time() - cpu_before, time.monotonic() - wall_before
    busy = max(0.0, cpu_s - SPIN[0]) / wall_s * 100 if wall_s > 0 else 0.0
    with open(spec["samples"] + ".generator.json", "w") as fh:
        json.dump({"cpu_s": cpu_s, "spin_s": SPIN[0], "wall_s": wall_s, "busy_percent": busy}, fh)
    tmp = spec["samples"] + ".tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["start_s", "latency_ms", "ok", "error", "late_ms"])
        for r in generator.records:
            ok = r.status == 200 and not r.error
            end = r.done if r.done else r.sent
            writer.writerow(
                [
                    f"{r.scheduled + epoch_minus_loop:.6f}",
                    f"{(end - r.scheduled) * 1000:.3f}",
                    int(ok),
                    "" if ok else (r.error or f"http-{r.status}"),
                    f"{max(0.0, r.sent - r.scheduled) * 1000:.3f}",
                ]
            )
    os.replace(tmp, spec["samples"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
