"""Triton's extensions that its tools rely on: the model configuration and statistics, read by
tritonclient, and Triton's own load generator (perf_analyzer) measuring a served variant.

perf_analyzer comes from PyPI's ``perf-analyzer`` wheel, which needs glibc 2.38; the install script in
``benchmarks/peers/perf_analyzer.sh`` runs it through Debian trixie's loader (downloaded from the Debian
mirror, no system change). The test installs it into the user cache when absent; where it cannot be
installed it skips with the reason, except in CI, where it fails.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from optiserve.types import Endpoint
from tests.conftest import REPO_ROOT, random_inputs

pytestmark = pytest.mark.slow

PERF_ANALYZER = REPO_ROOT / "benchmarks" / "peers" / "perf_analyzer.sh"


@pytest.fixture(scope="module")
def client(mlp_endpoint: Endpoint) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(mlp_endpoint.url.removeprefix("http://"))


def test_model_config_describes_the_variant(
    client: triton.InferenceServerClient, mlp_endpoint: Endpoint
) -> None:
    model = mlp_endpoint.service.variant.model.name
    config = client.get_model_config(model)
    assert config["name"] == model
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == mlp_endpoint.service.batching.max_batch_size
    assert config["input"] == [
        {"name": "input", "data_type": "TYPE_FP32", "dims": [16]}
    ]  # batch axis left out
    assert config["output"][0]["data_type"] == "TYPE_FP32"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    (preferred,) = config["dynamic_batching"]["preferred_batch_size"]  # calibrated at warm-up
    assert 1 <= preferred <= config["max_batch_size"]
    assert client.get_model_config(model, model_version="1") == config
    assert "model_configuration" in client.get_server_metadata()["extensions"]


def test_statistics_count_what_the_server_did(
    client: triton.InferenceServerClient, mlp_endpoint: Endpoint
) -> None:
    model = mlp_endpoint.service.variant.model.name

    def stats() -> dict[str, object]:
        (only,) = client.get_inference_statistics(model)["model_stats"]
        return only  # type: ignore[no-any-return]

    before = stats()
    x = triton.InferInput("input", [3, 16], "FP32")
    x.set_data_from_numpy(random_inputs(3))
    for _ in range(4):
        client.infer(model, [x])
    after = stats()
    assert after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 12  # type: ignore[operator]
    assert after["execution_count"] - before["execution_count"] == 4  # type: ignore[operator]
    ok_before, ok_after = before["inference_stats"]["success"], after["inference_stats"]["success"]  # type: ignore[index]
    assert ok_after["count"] - ok_before["count"] == 4
    assert ok_after["ns"] > ok_before["ns"]
    infer_after = after["inference_stats"]["compute_infer"]  # type: ignore[index]
    assert infer_after["ns"] > before["inference_stats"]["compute_infer"]["ns"]  # type: ignore[index]
    assert any(b["batch_size"] == 3 for b in after["batch_stats"])  # type: ignore[attr-defined]


def perf_analyzer_home() -> Path:
    """perf_analyzer's install folder: $PERF_ANALYZER_HOME, else installed into the user cache."""
    if os.environ.get("PERF_ANALYZER_HOME"):
        return Path(os.environ["PERF_ANALYZER_HOME"])
    home = Path.home() / ".cache" / "optiserve" / "perf_analyzer"
    done = subprocess.run(
        ["bash", str(PERF_ANALYZER), "--install", str(home)], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        reason = f"perf_analyzer could not be installed: {(done.stderr or done.stdout).strip()[-300:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: every tool must be present)")
        pytest.skip(reason)
    return home


def run_perf_analyzer(endpoint: Endpoint, *mode: str) -> str:
    done = subprocess.run(
        [
            "bash",
            str(PERF_ANALYZER),
            "-m",
            endpoint.service.variant.model.name,
            "-u",
            endpoint.url.removeprefix("http://"),
            "-i",
            "http",
            "--measurement-interval",
            "1500",
            "--stability-percentage",
            "50",
            "--max-trials",
            "6",
            # Its default random data is random bytes: NaN and Inf among them, which the server refuses.
            "--input-data",
            "zero",
            *mode,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PERF_ANALYZER_HOME=str(perf_analyzer_home())),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize(
    "mode",
    [
        ("--concurrency-range", "2:2"),
        ("--request-rate-range", "40"),
        ("--concurrency-range", "1:1", "--input-tensor-format", "json", "--output-tensor-format", "json"),
    ],
    ids=["concurrency", "request-rate", "json"],
)
def test_perf_analyzer_measures_a_served_variant(mlp_endpoint: Endpoint, mode: tuple[str, ...]) -> None:
    out = run_perf_analyzer(mlp_endpoint, *mode)
    throughput = float(re.search(r"Throughput: ([\d.]+) infer/sec", out).group(1))  # type: ignore[union-attr]
    p50_us = int(re.search(r"p50 latency: (\d+) usec", out).group(1))  # type: ignore[union-attr]
    assert throughput > 10 and 0 < p50_us < 1_000_000, out
    # The server-side split comes from our statistics extension: counts that grew, in its own words.
    server = re.search(r"Server:\s+Inference count: (\d+)", out)
    assert server and int(server.group(1)) > 0, out
    assert np.isfinite(throughput)
