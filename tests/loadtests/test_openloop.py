"""The open-loop generator and coordinated omission, against real servers (a null endpoint that can
stall, and Locust for the closed loop)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from optiserve.loadtests.openloop import send_times
from optiserve.loadtests.runner import run_level, write_payloads
from optiserve.loadtests.stats import measured_window, read_samples
from optiserve.procs import free_port, spawn, stop_group
from optiserve.types import Endpoint, LoadSpec, Variant
from tests.conftest import null_server, random_inputs


def test_constant_schedule_is_evenly_spaced() -> None:
    t = send_times([(2.0, 50.0)], "constant")
    assert len(t) == 100
    np.testing.assert_allclose(np.diff(t), 0.02)


def test_poisson_schedule_has_the_mean_rate_and_exponential_gaps() -> None:
    t = send_times([(200.0, 50.0)], "poisson", seed=3)
    assert len(t) == 10_000  # the rate asked for, exactly: only the spacing is random
    short = [len(send_times([(4.0, rate)], "poisson")) for rate in (40.0, 80.0, 113.14)]
    assert short == [160, 320, 453]  # a short search level offers its nominal rate too
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: CV = 1 (constant spacing: 0)
    assert t.max() < 200.0


def test_profile_segments_follow_each_other() -> None:
    t = send_times([(1.0, 10.0), (1.0, 100.0), (1.0, 10.0)], "constant")
    counts = np.histogram(t, bins=[0, 1, 2, 3])[0]
    assert counts.tolist() == [10, 100, 10]


@pytest.fixture
def null_endpoint(
    tmp_path: Path, onnx_source: Variant, variants_workdir: Path, request: pytest.FixtureRequest
) -> Iterator[Endpoint]:
    """A null server (optionally stalling) posing as a served variant."""
    stall = getattr(request, "param", None)
    cpus = frozenset({1}) if len(os.sched_getaffinity(0)) > 1 else None
    log = tmp_path / "null.log"
    with null_server(onnx_source, variants_workdir, log, cpus=cpus, stall=stall) as endpoint:
        yield endpoint


def open_level(rate: float, duration_s: float, warmup_s: float = 1.0) -> LoadSpec:
    return LoadSpec(
        scenario="open-loop",
        load_model="open",
        users=64,
        duration_s=duration_s,
        warmup_s=warmup_s,
        rate_rps=rate,
    )


def test_open_loop_against_a_null_endpoint_sends_on_schedule(null_endpoint: Endpoint, tmp_path: Path) -> None:
    payloads = write_payloads(tmp_path / "p.jsonl", random_inputs(4), "input")
    result = run_level(null_endpoint, open_level(400, 3), payloads, tmp_path / "s", capacity_rps=None)
    assert result.n_errors == 0
    assert 1100 <= result.n_requests <= 1300  # 400/s × 3 s, from the scheduled times
    assert result.integrity.target_rps == 400
    assert result.integrity.late_fraction is not None
    assert (
        result.ci_p99_ms is not None
        and result.ci_p99_ms.low <= result.latency_ms.p99 <= result.ci_p99_ms.high
    )  # type: ignore[union-attr]
    samples = read_samples(Path(result.samples_path))
    assert samples.late_ms is not None and len(samples.late_ms) == len(samples)


@pytest.mark.slow
@pytest.mark.parametrize("null_endpoint", [(3.0, 0.6)], indirect=True)
def test_coordinated_omission_open_loop_shows_a_stall_that_a_paced_closed_loop_hides(
    null_endpoint: Endpoint, tmp_path: Path
) -> None:
    """The server stops answering for 0.6 s, 3 s into the run. At the same 100 req/s, the open loop
    (latency from the scheduled send) sees every request scheduled during the stall wait; the paced
    closed loop (Locust, constant_throughput) sends nothing while it waits, so it records the stall
    once and its p99 looks healthy. Coordinated omission, measured."""
    payloads = write_payloads(tmp_path / "p.jsonl", random_inputs(4), "input")
    rate, duration = 100.0, 6.0
    opened = run_level(null_endpoint, open_level(rate, duration), payloads, tmp_path / "open")
    assert opened.latency_ms is not None
    assert opened.latency_ms.p99 > 250, opened.latency_ms  # ~60 requests queued behind the stall
    stalled = np.asarray(read_samples(Path(opened.samples_path)).latency_ms)
    assert (stalled > 100).sum() >= 30

    # The null server stalls once per process: a fresh one for the closed loop.
    closed_load = LoadSpec(
        scenario="paced", load_model="closed", users=1, duration_s=duration, warmup_s=1.0, rate_rps=rate
    )
    port = free_port()
    log = tmp_path / "null2.log"
    proc = spawn([sys.executable, "-m", "optiserve.loadtests.null_server", str(port), "3.0", "0.6"], log=log)
    try:
        deadline = time.monotonic() + 10
        while b"ready" not in (log.read_bytes() if log.exists() else b"") and time.monotonic() < deadline:
            time.sleep(0.05)
        endpoint = null_endpoint.model_copy(update={"url": f"http://127.0.0.1:{port}"})
        closed = run_level(
            endpoint, closed_load, payloads, tmp_path / "closed", user_class="PacedClosedLoopUser"
        )
    finally:
        stop_group(proc, grace_s=2)
    assert closed.latency_ms is not None
    window = measured_window(read_samples(Path(closed.samples_path)), 1.0)
    assert window.samples.latency_ms.max() > 400  # it did meet the stall, once
    assert closed.latency_ms.p99 < 100, closed.latency_ms  # and its p99 hides it
    assert closed.throughput_rps < rate * 1.05
