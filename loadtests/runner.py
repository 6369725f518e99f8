"""Run one load level with Locust as a subprocess and turn its raw samples into a BenchResult."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from optiserve.errors import LoadTestError
from optiserve.fsutil import atomic_write_text
from optiserve.hardware import machine_info
from optiserve.procs import spawn, stop_group, tail
from optiserve.types import BenchResult, Endpoint, LoadSpec

from .stats import latency_stats, measured_window, read_samples

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def write_payloads(path: Path, samples: np.ndarray, input_name: str, limit: int = 8) -> Path:
    """Open Inference Protocol infer requests with binary tensor data, one sample each, several distinct
    ones; one JSON line per request (``body`` base64-encoded, ``header_length``)."""
    from optiserve.services.oip_codec import encode_request

    lines = []
    for i in range(min(limit, len(samples))):
        body, header_length = encode_request(input_name, samples[i : i + 1])
        lines.append(json.dumps({"body": base64.b64encode(body).decode(), "header_length": header_length}))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run_level(
    endpoint: Endpoint, load: LoadSpec, payloads: Path, out_dir: Path, *, user_class: str
) -> BenchResult:
    variant = endpoint.service.variant
    stem = f"{variant.id}.{endpoint.service.runtime}.{load.scenario}.u{load.users}"
    samples_path = out_dir / f"{stem}.samples.csv"
    log = out_dir / f"{stem}.locust.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    run_time = load.warmup_s + load.duration_s
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        user_class,
        "--headless",
        "--host",
        endpoint.url,
        "--users",
        str(load.users),
        "--spawn-rate",
        str(max(load.users, 1)),
        "--run-time",
        f"{max(1, round(run_time))}s",
        "--stop-timeout",
        "10",
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
    ]
    env = dict(
        os.environ,
        OPTISERVE_PAYLOADS=str(payloads),
        OPTISERVE_SAMPLES=str(samples_path),
        OPTISERVE_PATH=endpoint.infer_url.removeprefix(endpoint.url),
        PYTHONUNBUFFERED="1",
    )
    started = dt.datetime.now(dt.UTC)
    proc = spawn(cmd, log=log, env=env)
    try:
        deadline = time.monotonic() + run_time + 60
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        code = stop_group(proc, grace_s=10)
    if code != 0 or not samples_path.exists():
        raise LoadTestError(f"locust failed (exit {code}) for {stem}; last lines of {log}:\n{tail(log)}")
    window = measured_window(read_samples(samples_path), load.warmup_s)
    n = len(window.samples)
    if n == 0:
        raise LoadTestError(
            f"no request finished after the {load.warmup_s:.0f}s warm-up for {stem}; see {log}"
        )
    return BenchResult(
        variant_id=variant.id,
        runtime=endpoint.service.runtime,
        precision=variant.precision,
        endpoint=endpoint,
        load=load,
        machine=machine_info(),
        started_at=started,
        measured_s=window.seconds,
        n_requests=n,
        n_errors=window.n_errors,
        error_rate=window.n_errors / n,
        throughput_rps=window.throughput,
        latency_ms=latency_stats(window.samples.latency_ms[window.samples.ok]),
        errors_by_kind=window.errors_by_kind(),
        samples_path=str(samples_path),
    )
