"""Overload: a real server driven by the open-loop generator at three times what it can serve sheds
with 503 + ``Retry-After`` instead of queueing without bound, keeps its memory, stays ready, and is as
fast as before within seconds of the load dropping. And a 503 for "not ready yet" says when to retry.

The tiny MLP answers in microseconds, so HTTP, not the model, would be the bottleneck and the batcher
would never see a queue; the overload test serves a hand-built ONNX model of the same input and output
with ~10 ms of real matrix work per sample on one ONNX Runtime thread (efficientnet-lite0's order of
cost on a CPU), so capacity is the model's, ~100 samples/s, and three times it stays cheap for the
HTTP side and the generator on a 2-core machine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from optiserve.deploy.targets.local import LocalTarget
from optiserve.loadtests.runner import write_payloads
from optiserve.loadtests.stats import read_samples
from optiserve.manifest import write_model
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.source import materialize_source
from optiserve.procs import spawn, stop_group, tail
from optiserve.services.oip_codec import HEADER_LENGTH, encode_request
from optiserve.types import BatchingSpec, Endpoint, Variant
from tests.conftest import REPO_ROOT, cli_env, random_inputs, service_spec
from tests.tiny_models import N_IN, N_OUT

MAX_LATENCY_MS = 250
"""The shedding deadline of the overload test's server: a request is shed rather than answered later."""
SERVER_CPUS, GENERATOR_CPUS = (
    (frozenset({1}), frozenset({0})) if len(os.sched_getaffinity(0)) > 1 else (None, None)
)
"""As `optiserve run` pins them: the generator waits for its send times actively, and would otherwise
take the server's CPU (the server's capacity is measured under the same pinning)."""
OVERLOAD = 3.0
OVERLOAD_S = 30.0
RECOVERY_S = 10.0


# --- "not ready yet" -------------------------------------------------------------------------------------

NOT_READY_SCRIPT = """
import asyncio, json, sys
from pathlib import Path

import httpx

from optiserve.manifest import read_model
from optiserve.services.core import ServingCore
from optiserve.services.oip import create_app
from optiserve.types import ServiceSpec

spec = read_model(Path(sys.argv[1]), ServiceSpec)
core = ServingCore(spec)  # loaded, not warmed up: not ready
app = create_app(lambda: core)
body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


async def main() -> None:
    seen = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://core") as client:

        async def probe(when: str) -> None:
            for path in ("/v2/health/ready", f"/v2/models/{spec.variant.model.name}/ready"):
                r = await client.get(path)
                seen[f"{when} GET {path}"] = [r.status_code, r.headers.get("retry-after"), None]
            r = await client.post(f"/v2/models/{spec.variant.model.name}/infer", json=body)
            seen[f"{when} infer"] = [r.status_code, r.headers.get("retry-after"), r.json().get("error")]

        await probe("before")
        await core.warm_up()
        await probe("after")
    print(json.dumps(seen))


asyncio.run(main())
"""


def test_a_503_before_the_model_is_ready_carries_retry_after(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    """The real ServingCore and routes, before and after warm-up (in a process of its own: a
    ServingCore registers process-wide metrics, and a served one is never seen before it is ready)."""
    spec_path = tmp_path / "service.json"
    write_model(spec_path, service_spec(onnx_source, variants_workdir, "onnxruntime"))
    done = subprocess.run(
        [sys.executable, "-c", NOT_READY_SCRIPT, str(spec_path)],
        cwd=REPO_ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for key, (status, retry_after, _) in seen.items():
        if key.startswith("before"):
            assert status == 503 and retry_after == "1", (key, seen)
        else:
            assert status == 200 and retry_after is None, (key, seen)
    assert "not ready yet" in seen["before infer"][2]


# --- overload --------------------------------------------------------------------------------------------


def write_heavy_onnx(path: Path, width: int = 512, layers: int = 6) -> Path:
    """input (n, 16) → an outer product to (n, width, width) → ``layers`` × (MatMul width×width, Tanh)
    → mean → (n, 5): ~width³·layers multiply-adds a sample (~10 ms on one core), linear in n, weights
    in cache; the tiny MLP's input and output, so the tests' payloads fit."""
    rng = np.random.default_rng(0)

    def init(name: str, array: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(array, name)

    inits = [
        init("w_in", (rng.standard_normal((N_IN, width)) / 4).astype(np.float32)),
        init("column", np.array([-1, width, 1], dtype=np.int64)),
        init("w_row", rng.standard_normal((1, width)).astype(np.float32)),
        init("w_out", (rng.standard_normal((width, N_OUT)) / 16).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w_in"], ["h"]),
        helper.make_node("Reshape", ["h", "column"], ["c"]),
        helper.make_node("MatMul", ["c", "w_row"], ["m0"]),
    ]
    for i in range(layers):
        inits.append(init(f"w{i}", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)))
        nodes += [
            helper.make_node("MatMul", [f"m{i}", f"w{i}"], [f"p{i}"]),
            helper.make_node("Tanh", [f"p{i}"], [f"m{i + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceMean", [f"m{layers}"], ["r"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["r", "w_out"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", N_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_OUT])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def heavy_server(tmp_path: Path) -> Iterator[tuple[LocalTarget, Endpoint]]:
    variant = materialize_source(resolve_model(str(write_heavy_onnx(tmp_path / "heavy.onnx"))), tmp_path)
    spec = service_spec(variant, tmp_path, "onnxruntime").model_copy(
        update={"batching": BatchingSpec(max_batch_size=4, max_latency_ms=MAX_LATENCY_MS)}
    )
    with LocalTarget(tmp_path, ready_timeout_s=120) as deployment:
        yield deployment, deployment.start(spec, cpus=SERVER_CPUS)


class Client:
    """One keep-alive connection sending the binary infer request the generator sends."""

    def __init__(self, endpoint: Endpoint) -> None:
        body, header_length = encode_request("input", random_inputs(1, seed=7))
        self.body = body
        self.headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
        self.url = endpoint.infer_url
        self.http = httpx.Client(timeout=30)

    def infer(self) -> tuple[float, httpx.Response]:
        started = time.perf_counter()
        response = self.http.post(self.url, content=self.body, headers=self.headers)
        return (time.perf_counter() - started) * 1000, response

    def p50_ms(self, n: int) -> float:
        """Median latency of ``n`` requests one after another (low load: one in flight)."""
        times = []
        for _ in range(n):
            ms, response = self.infer()
            assert response.status_code == 200, response.text
            times.append(ms)
        return float(np.median(times))


def capacity_rps(endpoint: Endpoint, clients: int = 8, seconds: float = 3.0) -> float:
    """Answers a second with ``clients`` requests always in flight (a queue of ~clients samples, well
    inside the shedding deadline): what the server can serve."""
    client = Client(endpoint)

    async def run() -> int:
        done = 0
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=30) as http:

            async def user() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    r = await http.post(client.url, content=client.body, headers=client.headers)
                    assert r.status_code == 200, r.text
                    done += 1

            await asyncio.gather(*(user() for _ in range(clients)))
        return done

    started = time.monotonic()
    done = asyncio.run(run())
    return done / (time.monotonic() - started)


def tree_rss(root: psutil.Process) -> int:
    """Resident memory of the server: BentoML's supervisor and its worker(s)."""
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that just exited
            total += p.memory_info().rss
    return total


def start_open_loop(endpoint: Endpoint, rate: float, out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """The open-loop generator (optiserve.loadtests.openloop): ``rate`` req/s for OVERLOAD_S, scheduled
    in advance, latency counted from each scheduled send; 256 connections, so the generator is never
    the queue (at the deadline, ~rate × 0.25 s requests are in flight)."""
    payloads = write_payloads(out / "payloads.jsonl", random_inputs(8, seed=3), "input")
    samples = out / "overload.samples.csv"
    spec = {
        "host": endpoint.service.host,
        "port": endpoint.service.port,
        "path": endpoint.infer_url.removeprefix(endpoint.url),
        "payloads": str(payloads),
        "samples": str(samples),
        "segments": [[OVERLOAD_S, rate]],
        "arrival": "constant",
        "users": 256,
        "seed": 0,
    }
    spec_path = out / "overload.spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "optiserve.loadtests.openloop", "--spec", str(spec_path)]
    return spawn(cmd, log=out / "openloop.log", env=cli_env(), cpus=GENERATOR_CPUS), samples


@pytest.mark.slow
def test_three_times_capacity_is_shed_with_retry_after_and_the_server_recovers(
    heavy_server: tuple[LocalTarget, Endpoint], tmp_path: Path, figures: Callable[[str, object], None]
) -> None:
    deployment, endpoint = heavy_server
    server = psutil.Process(deployment.process(endpoint).pid)  # type: ignore[attr-defined]
    client = Client(endpoint)
    capacity = capacity_rps(endpoint)
    baseline_ms = client.p50_ms(30)
    rss_before = tree_rss(server)
    rate = OVERLOAD * capacity

    generator, samples_path = start_open_loop(endpoint, rate, tmp_path)
    rss_peak, retry_afters, probe_statuses = rss_before, [], []
    next_probe = time.monotonic()
    try:
        while generator.poll() is None:
            rss_peak = max(rss_peak, tree_rss(server))
            if time.monotonic() >= next_probe:  # a client of our own among the generator's
                _, response = client.infer()
                probe_statuses.append(response.status_code)
                if response.status_code == 503:
                    retry_afters.append(response.headers.get("retry-after"))
                next_probe = time.monotonic() + 0.5
            time.sleep(0.2)
    finally:
        code = stop_group(generator, grace_s=10)
    assert code == 0, tail(tmp_path / "openloop.log")

    # The load has dropped: how soon is a lone request as fast as before?
    samples = read_samples(samples_path)
    dropped = float(samples.start_s.max())  # the last scheduled send (epoch seconds)
    recovered_after = None
    while time.time() - dropped < RECOVERY_S + 5:
        if client.p50_ms(9) <= 1.5 * baseline_ms:
            recovered_after = time.time() - dropped
            break
    ready = httpx.get(f"{endpoint.url}/v2/health/ready", timeout=10).status_code

    ok = samples.ok
    shed = np.array([e == "http-503" for e in samples.error])
    other = ~ok & ~shed
    other_errors = sorted(set(np.array(samples.error)[other]))
    p50_ok, p99_ok = np.percentile(samples.latency_ms[ok], [50, 99]) if ok.any() else (np.nan, np.nan)
    mib = 1024**2
    recovery = "NEVER" if recovered_after is None else f"{recovered_after:.1f} s after the load dropped"
    print(
        f"\noverload figures: capacity {capacity:.1f} req/s (8 clients, closed loop); offered "
        f"{rate:.1f} req/s, open loop, for {OVERLOAD_S:.0f} s = {len(samples)} requests; answered "
        f"{int(ok.sum())} ({ok.sum() / OVERLOAD_S:.1f}/s; p50 {p50_ok:.0f} ms, p99 {p99_ok:.0f} ms from "
        f"the scheduled send; max_latency_ms {MAX_LATENCY_MS}); shed with 503 {int(shed.sum())} "
        f"({shed.mean():.0%}); other errors {int(other.sum())} {other_errors}; our probes got "
        f"{dict(sorted(Counter(probe_statuses).items()))}, Retry-After {sorted(set(retry_afters))}; "
        f"server RSS {rss_before / mib:.0f} MiB before, peak {rss_peak / mib:.0f} MiB "
        f"(+{(rss_peak - rss_before) / mib:.1f}); low-load p50 {baseline_ms:.1f} ms before, back within "
        f"1.5x {recovery}"
    )

    figures("overload: capacity / offered (req/s)", f"{capacity:.1f} / {rate:.1f} for {OVERLOAD_S:.0f} s")
    figures(
        "overload: answered / shed 503 / other", f"{int(ok.sum())} / {int(shed.sum())} / {int(other.sum())}"
    )
    figures("overload: answered p99 / max_latency_ms", f"{p99_ok:.0f} / {MAX_LATENCY_MS} ms")
    figures("overload: RSS growth", f"+{(rss_peak - rss_before) / mib:.1f} MiB")
    figures("overload: p50 back within 1.5x after", recovery.removesuffix(" after the load dropped"))
    assert deployment.process(endpoint).poll() is None and ready == 200  # type: ignore[attr-defined]
    assert not other.any(), other_errors
    # Shed, not queued: a third of the offered load can be served, so most of the rest is refused...
    assert shed.mean() > 0.4, shed.mean()
    assert ok.sum() / OVERLOAD_S > 0.5 * capacity  # ...while the server keeps serving near capacity,
    assert p99_ok < 5 * MAX_LATENCY_MS  # and what it answers comes within the deadline's order.
    assert retry_afters, f"no probe met a 503: {probe_statuses}"
    assert all(r is not None and r.isdigit() and int(r) >= 1 for r in retry_afters), retry_afters
    assert rss_peak - rss_before < 100 * mib
    assert recovered_after is not None and recovered_after < RECOVERY_S


@pytest.mark.slow
def test_a_deadline_shorter_than_one_inference_does_not_shed_the_warm_up(tmp_path: Path) -> None:
    """The warm-up's burst of concurrent requests must never be shed, or the server could not start
    whenever max_latency_ms is below what the burst takes (`tune` searches such deadlines)."""
    variant = materialize_source(resolve_model(str(write_heavy_onnx(tmp_path / "heavy.onnx"))), tmp_path)
    spec = service_spec(variant, tmp_path, "onnxruntime").model_copy(
        update={"batching": BatchingSpec(max_batch_size=2, max_latency_ms=2)}
    )
    with LocalTarget(tmp_path, ready_timeout_s=120) as deployment:
        endpoint = deployment.start(spec, cpus=SERVER_CPUS)
        _, response = Client(endpoint).infer()
    assert response.status_code == 200, response.text
