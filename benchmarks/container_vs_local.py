"""The container against a local process, measured side by side in one run: efficientnet-lite0, ONNX FP32.

The same variant is served twice on the same CPU, one at a time: as a local ``bentoml serve`` process
(the local target) and as its image run with the chart's pod settings (the docker target, the
container pinned with ``--cpuset-cpus`` to that CPU). This process, the client, runs on the other CPU.
Rounds alternate local and container so that noise from other processes hits both alike. Printed:

1. the image build: the first build (base image and wheelhouse included if not cached), then a second
   build from a warm cache, and the image size;
2. start-to-ready of each (process or container start → readiness probe answers);
3. concurrency 1: served p50 (one keep-alive connection, binary tensor data) of each and the ratio
   local p50 ÷ container p50 (goal >= 0.95: the container is at most ~5% slower);
4. saturated throughput (32 users) of each and the ratio container ÷ local (goal >= 0.95).

    python benchmarks/container_vs_local.py                 # server on CPU 1, client on CPU 0
    python benchmarks/container_vs_local.py --rounds 6 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from serving_efficiency import RawClient, onnx_fp32, pin_client, saturate, verdict

from optiserve.deploy.bento import build_bento, build_wheel
from optiserve.deploy.images import build_image
from optiserve.deploy.targets.base import Target
from optiserve.deploy.targets.docker import DockerTarget
from optiserve.deploy.targets.local import LocalTarget
from optiserve.manifest import variant_dir
from optiserve.models.resolve import dataset
from optiserve.services.oip_codec import encode_request
from optiserve.types import ServiceSpec, ThreadSpec

GOAL = 0.95
USERS = 32
PROXIED: list[bool] = []
"""Whether the container's published port went through a docker-proxy process (the daemon's userland
proxy) rather than the kernel's forwarding; `make docker-daemon` starts dockerd without it."""


def measure(
    target: Target, service: ServiceSpec, cpu: int, body: bytes, header_length: int, args: argparse.Namespace
) -> tuple[float, float, float]:
    """(start-to-ready s, p50 s at concurrency 1, saturated req/s) of one server, started and stopped."""
    started = time.perf_counter()
    endpoint = target.start(service, cpus=frozenset({cpu}))
    ready_s = time.perf_counter() - started
    if target.name == "docker":
        PROXIED.append(subprocess.run(["pgrep", "-x", "docker-proxy"], capture_output=True).returncode == 0)
    try:
        path = endpoint.infer_url.removeprefix(endpoint.url)
        client = RawClient("127.0.0.1", endpoint.service.port or 0, path, body, header_length)
        client.latencies(50)  # warm the connection and the server
        p50 = float(np.median(client.latencies(args.reps)))
        rate, statuses = asyncio.run(saturate(endpoint.url, path, body, header_length, USERS, args.seconds))
        if set(statuses) != {200}:
            raise SystemExit(f"{target.name}: non-200 answers under load: {statuses}")
    finally:
        target.stop(endpoint)
    return ready_s, p50, rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=8.0, help="per saturation measurement")
    args = parser.parse_args()
    pin_client(args)

    with tempfile.TemporaryDirectory(prefix="container-bench.") as tmp:
        work = Path(tmp)
        spec, variant = onnx_fp32(work)
        service = ServiceSpec(
            variant=variant,
            variant_dir=str(variant_dir(work, variant.id)),
            runtime="onnxruntime",
            threads=ThreadSpec(),
        )
        x, what = dataset(spec, "eval", 1)
        body, header_length = encode_request("input", x[:1])

        wheel = build_wheel(work / "wheel")
        builds = [build_image(build_bento(service, wheel), wheel) for _ in range(2)]
        cold, warm = builds

        results: dict[str, list[tuple[float, float, float]]] = {"local": [], "container": []}
        with (
            LocalTarget(work, ready_timeout_s=300) as local,
            DockerTarget(work, ready_timeout_s=300) as docker,
        ):
            for i in range(args.rounds):
                order = [("local", local), ("container", docker)]
                for name, target in order if i % 2 == 0 else order[::-1]:
                    results[name].append(measure(target, service, args.server_cpu, body, header_length, args))

    med = {k: np.median(np.array(v), axis=0) for k, v in results.items()}
    p50_ratio = med["local"][1] / med["container"][1]
    rate_ratio = med["container"][2] / med["local"][2]
    print(
        f"efficientnet-lite0 ONNX FP32 on onnxruntime, 1 intra-op thread; server on CPU {args.server_cpu}, "
        f"client on CPU {args.client_cpu}; input: {what}; {args.rounds} alternating rounds"
    )
    print(
        f"1. image {cold.tag}: {cold.size_bytes / 1e6:.0f} MB; first build {cold.build_s:.1f}s"
        f"{' (base image built too)' if cold.base_built else ''}, from a warm cache {warm.build_s:.1f}s"
    )
    proxy = "a docker-proxy process" if any(PROXIED) else "the kernel (no userland proxy)"
    print(f"   the container's published port is forwarded by {proxy}")
    print(
        f"2. start to ready: local process {med['local'][0]:.1f}s, container {med['container'][0]:.1f}s "
        "(median)"
    )
    print(
        f"3. concurrency 1 p50: local {med['local'][1] * 1e3:.2f} ms, "
        f"container {med['container'][1] * 1e3:.2f} ms "
        f"→ local/container {p50_ratio:.3f}; goal >= {GOAL}: {verdict(p50_ratio >= GOAL)}"
    )
    print(
        f"4. saturated throughput ({USERS} users): local {med['local'][2]:.1f}/s, container "
        f"{med['container'][2]:.1f}/s → container/local {rate_ratio:.3f}; goal >= {GOAL}: "
        f"{verdict(rate_ratio >= GOAL)}"
    )
    for name, rows in results.items():
        print(f"   {name:>9} rounds: " + ", ".join(f"p50 {p * 1e3:.2f} ms / {r:.1f}/s" for _, p, r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
