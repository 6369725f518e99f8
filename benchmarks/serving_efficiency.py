"""What the service adds on top of the runtime, measured in one run: efficientnet-lite0, ONNX FP32.

The server (``bentoml serve``, ONNX Runtime with 1 intra-op thread, default batching) is pinned to one
CPU, this process (the load generator) to another, and the in-process reference runs in a separate
process pinned to the server's CPU with the same session settings. Printed:

1. serving overhead at concurrency 1: served p50 (Open Inference Protocol, binary tensor data, one
   keep-alive connection) ÷ in-process ONNX Runtime p50 on the same input — measured in alternating
   rounds so that noise from other processes hits both alike (goal <= 1.15);
2. batching efficiency: saturated served throughput ÷ in-process throughput at its best batch size
   (goal >= 0.85);
3. closed-loop sweeps up to 64 users with the default batching settings: requests, errors, 503s
   (goal: no 503).

    python benchmarks/serving_efficiency.py                 # server on CPU 1, client on CPU 0
    python benchmarks/serving_efficiency.py --server-cpu 0 --client-cpu 1 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from optiserve.deploy.targets.local import LocalTarget
from optiserve.loadtests.openloop import http_request
from optiserve.manifest import variant_dir
from optiserve.models.resolve import dataset, resolve_model
from optiserve.optimizers.base import OptimizeContext
from optiserve.optimizers.onnx_export import OnnxExport
from optiserve.optimizers.source import materialize_source
from optiserve.services.oip_codec import encode_request
from optiserve.types import ModelSpec, ServiceSpec, ThreadSpec, Variant

GOAL_OVERHEAD, GOAL_EFFICIENCY = 1.15, 0.85
BATCHES = (1, 2, 4, 8, 16, 32)

REFERENCE = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
path, data = sys.argv[1], np.load(sys.argv[2])
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
s = ort.InferenceSession(
    path, o, providers=["CPUExecutionProvider"], disabled_optimizers=["WeightBiasQuantization"]
)
name = s.get_inputs()[0].name
one = data[:1]
for _ in range(20): s.run(None, {name: one})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "latency":
        out = []
        for _ in range(cmd["n"]):
            t = time.perf_counter(); s.run(None, {name: one}); out.append(time.perf_counter() - t)
    else:
        b = cmd["batch"]; x = np.ascontiguousarray(np.resize(data, (b, *data.shape[1:])))
        s.run(None, {name: x}); t = time.perf_counter(); k = 0
        while time.perf_counter() - t < cmd["seconds"]:
            s.run(None, {name: x}); k += b
        out = k / (time.perf_counter() - t)
    print(json.dumps(out), flush=True)
"""


class Reference:
    """ONNX Runtime in its own process, pinned to the server's CPU, answering timing requests."""

    def __init__(self, model: Path, data: Path, cpu: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REFERENCE, str(model), str(data)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )

    def ask(self, **cmd: object) -> object:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()


def read_response_head(head: bytes) -> tuple[int, int]:
    """(status, content length) of an HTTP/1.1 response head."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(
        int(v)
        for k, _, v in (ln.partition(b":") for ln in lines[1:])
        if k.strip().lower() == b"content-length"
    )
    return status, length


class RawClient:
    """One keep-alive HTTP/1.1 connection sending a prebuilt request: the least client overhead.
    ``header_length`` None: a plain JSON request; else the binary tensor extension's."""

    def __init__(self, host: str, port: int, path: str, body: bytes, header_length: int | None) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = http_request(host, path, body, header_length)
        self.buffer = b""

    def call(self) -> int:
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        status, length = read_response_head(head)
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buffer = rest[length:]
        return status

    def timed(self, n: int) -> tuple[list[float], str | None]:
        """Latencies of n sequential requests; stops at the first non-200 and says which."""
        out = []
        for _ in range(n):
            t = time.perf_counter()
            status = self.call()
            out.append(time.perf_counter() - t)
            if status != 200:
                return out, f"HTTP {status}"
        return out, None

    def latencies(self, n: int) -> list[float]:
        out, refused = self.timed(n)
        if refused:
            raise SystemExit(f"the server answered {refused}")
        return out


async def saturate(
    url: str, path: str, body: bytes, header_length: int, users: int, seconds: float
) -> tuple[float, dict[int, int]]:
    import httpx

    headers = {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    statuses: dict[int, int] = {}
    done = 0
    stop = time.perf_counter() + seconds

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            r = await client.post(path, content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            done += r.status_code == 200

    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(users)))
        elapsed = time.perf_counter() - started
    return done / elapsed, statuses


def pin_client(args: argparse.Namespace) -> None:
    """This process (the client) on --client-cpu, apart from the server's --server-cpu."""
    if args.server_cpu == args.client_cpu:
        raise SystemExit("--server-cpu and --client-cpu must differ")
    os.sched_setaffinity(0, {args.client_cpu})


def onnx_fp32(work: Path) -> tuple[ModelSpec, Variant]:
    """efficientnet-lite0's spec and its FP32 ONNX variant, built in ``work``."""
    spec = resolve_model("efficientnet-lite0")
    return spec, OnnxExport().apply(materialize_source(spec, work), work, OptimizeContext(work))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=8.0, help="per saturation / sweep level")
    parser.add_argument("--sweep", default="1,2,4,8,16,32,64", help="closed-loop users for the 503 check")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the ServiceSpec's")
    args = parser.parse_args()
    pin_client(args)

    with tempfile.TemporaryDirectory(prefix="serving-bench.") as tmp:
        work = Path(tmp)
        spec, variant = onnx_fp32(work)
        model = variant_dir(work, variant.id) / variant.artifacts["model"].path
        x, what = dataset(spec, "eval", 32)
        np.save(work / "x.npy", x)
        body, header_length = encode_request("input", x[:1])
        service = ServiceSpec(
            variant=variant,
            variant_dir=str(variant_dir(work, variant.id)),
            runtime="onnxruntime",
            threads=ThreadSpec(),
        )
        if args.max_batch_size:
            batching = service.batching.model_copy(update={"max_batch_size": args.max_batch_size})
            service = service.model_copy(update={"batching": batching})
        reference = Reference(model, work / "x.npy", args.server_cpu)
        with LocalTarget(work, ready_timeout_s=300) as deployment:
            endpoint = deployment.start(service, cpus=frozenset({args.server_cpu}))
            path = endpoint.infer_url.removeprefix(endpoint.url)
            host, port = "127.0.0.1", endpoint.service.port or 0
            client = RawClient(host, port, path, body, header_length)
            client.latencies(50)  # warm the connection and the server
            served_p50, local_p50 = [], []
            for _ in range(args.rounds):
                local_p50.append(float(np.median(reference.ask(op="latency", n=args.reps))))  # type: ignore[arg-type]
                served_p50.append(float(np.median(client.latencies(args.reps))))
            ratios = np.array(served_p50) / np.array(local_p50)
            throughput = {
                k: float(reference.ask(op="throughput", batch=k, seconds=3.0))  # type: ignore[arg-type]
                for k in BATCHES
            }
            best_batch = max(throughput, key=lambda b: throughput[b])
            saturated = {
                users: asyncio.run(saturate(endpoint.url, path, body, header_length, users, args.seconds))
                for users in (8, 16, 32)
            }
            best_users = max(saturated, key=lambda u: saturated[u][0])
            sweep = {
                users: asyncio.run(saturate(endpoint.url, path, body, header_length, users, args.seconds))[1]
                for users in [int(u) for u in args.sweep.split(",")]
            }
        reference.close()

    overhead = float(np.median(ratios))
    efficiency = saturated[best_users][0] / throughput[best_batch]
    b = service.batching
    served_ms, local_ms = np.median(served_p50) * 1e3, np.median(local_p50) * 1e3
    best_served = saturated[best_users][0]
    print(
        f"efficientnet-lite0 ONNX FP32 on onnxruntime, 1 thread; "
        f"server on CPU {args.server_cpu}, client on CPU {args.client_cpu}"
    )
    print(f"input: {what}; batching: max_batch_size={b.max_batch_size}, max_latency_ms={b.max_latency_ms}")
    print(
        f"1. concurrency 1: served p50 {served_ms:.2f} ms, in-process p50 {local_ms:.2f} ms "
        f"→ overhead ratio {overhead:.3f} (median of {args.rounds} alternating rounds of {args.reps}; "
        f"range {ratios.min():.3f}-{ratios.max():.3f}); "
        f"goal <= {GOAL_OVERHEAD}: {verdict(overhead <= GOAL_OVERHEAD)}"
    )
    print("   in-process throughput by batch: " + ", ".join(f"b{k} {t:.1f}/s" for k, t in throughput.items()))
    print(
        "   served throughput by users: "
        + ", ".join(f"{u} users {r:.1f}/s" for u, (r, _) in saturated.items())
    )
    print(
        f"2. batching efficiency: served {best_served:.1f}/s ({best_users} users) ÷ in-process "
        f"{throughput[best_batch]:.1f}/s (batch {best_batch}) = {efficiency:.3f}; "
        f"goal >= {GOAL_EFFICIENCY}: {verdict(efficiency >= GOAL_EFFICIENCY)}"
    )
    total_503 = sum(s.get(503, 0) for s in sweep.values())
    for users, statuses in sweep.items():
        print(
            f"   {users:>3} users: {sum(statuses.values())} requests, "
            f"statuses {dict(sorted(statuses.items()))}"
        )
    print(f"3. 503s across the closed-loop sweep: {total_503}; goal 0: {verdict(total_503 == 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
