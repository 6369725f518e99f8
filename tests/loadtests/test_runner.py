"""A real Locust subprocess, driven by run_level, against a real server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from optiserve.loadtests.runner import run_level, write_payloads
from optiserve.loadtests.scenarios.closed_loop import ClosedLoop, ClosedLoopConfig
from optiserve.loadtests.stats import read_samples
from optiserve.services.oip_codec import parse_request
from optiserve.types import Endpoint, LoadSpec
from tests.conftest import random_inputs


def closed_loop(users: int, duration_s: float, warmup_s: float) -> LoadSpec:
    config = ClosedLoopConfig(concurrency=(users,), duration_s=duration_s, warmup_s=warmup_s)
    (level,) = ClosedLoop(config).levels()
    return level


def test_write_payloads_one_binary_oip_request_per_sample(tmp_path: Path) -> None:
    x = random_inputs(5)
    path = write_payloads(tmp_path / "payloads.jsonl", x, "input", limit=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 3
    body = base64.b64decode(records[2]["body"])
    request = parse_request(body, "application/octet-stream", str(records[2]["header_length"]))
    (tensor,) = request.inputs
    assert tensor.name == "input" and tensor.datatype == "FP32" and tensor.shape == (1, x.shape[1])
    np.testing.assert_array_equal(tensor.array, x[2:3])


@pytest.mark.slow
def test_run_level_measures_a_closed_loop(mlp_endpoint: Endpoint, tmp_path: Path) -> None:
    payloads = write_payloads(tmp_path / "payloads.jsonl", random_inputs(8), "input")
    load = closed_loop(users=2, duration_s=3, warmup_s=1)
    result = run_level(mlp_endpoint, load, payloads, tmp_path / "samples", user_class=ClosedLoop.user_class)

    samples_path = Path(result.samples_path)
    assert samples_path.is_file()
    assert result.n_requests > 0
    assert result.n_errors == 0 and result.error_rate == 0.0 and result.errors_by_kind == {}
    assert result.throughput_rps > 0
    assert result.latency_ms is not None
    assert 0 < result.latency_ms.p50 <= result.latency_ms.p99 <= result.latency_ms.max
    assert result.latency_ms.n == result.n_requests
    assert 1.5 <= result.measured_s <= 5.0
    assert result.load == load
    assert len(read_samples(samples_path)) > result.n_requests  # the warm-up's requests were dropped


@pytest.mark.slow
def test_run_level_counts_failed_requests(mlp_endpoint: Endpoint, tmp_path: Path) -> None:
    payloads = write_payloads(tmp_path / "payloads.jsonl", np.zeros((2, 15), dtype=np.float32), "input")
    load = closed_loop(users=1, duration_s=1, warmup_s=0)
    result = run_level(mlp_endpoint, load, payloads, tmp_path / "samples", user_class=ClosedLoop.user_class)
    assert result.n_requests > 0
    assert result.n_errors == result.n_requests
    assert result.errors_by_kind == {"http-422": result.n_requests}
    assert result.throughput_rps == 0.0


@pytest.mark.slow
def test_locust_with_worker_processes_merges_every_process_samples(
    mlp_endpoint: Endpoint, tmp_path: Path
) -> None:
    payloads = write_payloads(tmp_path / "payloads.jsonl", random_inputs(4), "input")
    load = closed_loop(users=4, duration_s=3, warmup_s=1)
    result = run_level(mlp_endpoint, load, payloads, tmp_path / "samples", processes=2)
    assert result.n_errors == 0 and result.n_requests > 0
    assert not list((tmp_path / "samples").glob("*.part-*"))  # merged into one file
    assert len(read_samples(Path(result.samples_path))) > result.n_requests
