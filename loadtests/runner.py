"""Run one load level with Locust as a subprocess and turn its raw samples into a BenchResult."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from optiserve.errors import LoadTestError
from optiserve.fsutil import atomic_write_text
from optiserve.hardware import machine_info
from optiserve.procs import spawn, stop_group, tail
from optiserve.types import BenchResult, Endpoint, Integrity, LoadSpec

from .stats import (
    Window,
    bootstrap_percentile_ci,
    describe_error_window,
    error_windows,
    late_fraction,
    latency_stats,
    measured_window,
    read_samples,
    stability,
    throughput_ci,
)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def write_payloads(
    path: Path, samples: np.ndarray, input_name: str, limit: int = 8, *, encoding: str = "binary"
) -> Path:
    """Open Inference Protocol infer requests, one sample each, several distinct ones; one JSON line per
    request (``body`` base64-encoded, ``header_length``: the binary tensor extension's JSON header
    length, or null for a plain-JSON request)."""
    from optiserve.services.oip_codec import encode_json_request, encode_request

    lines = []
    for i in range(min(limit, len(samples))):
        header_length: int | None
        if encoding == "json":
            body, header_length = encode_json_request(input_name, samples[i : i + 1]), None
        else:
            body, header_length = encode_request(input_name, samples[i : i + 1])
        lines.append(json.dumps({"body": base64.b64encode(body).decode(), "header_length": header_length}))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def level_stem(endpoint: Endpoint, load: LoadSpec) -> str:
    variant = endpoint.service.variant
    shape = f"r{load.rate_rps:g}" if load.load_model == "open" and load.rate_rps else f"u{load.users}"
    return f"{variant.id}.{endpoint.service.runtime}.{load.scenario}.{shape}"


def run_level(
    endpoint: Endpoint,
    load: LoadSpec,
    payloads: Path,
    out_dir: Path,
    *,
    user_class: str = "ClosedLoopUser",
    cpus: frozenset[int] | None = None,
    capacity_rps: float | None = None,
    stem: str | None = None,
    processes: int = 1,
) -> BenchResult:
    """Drive one load level (Locust for closed loops, with ``processes`` worker processes when > 1;
    the open-loop generator for open ones), on ``cpus`` when given, and turn its raw samples into a
    BenchResult with CIs and integrity checks."""
    stem = stem or level_stem(endpoint, load)
    samples_path = out_dir / f"{stem}.samples.csv"
    log = out_dir / f"{stem}.{'locust' if load.load_model == 'closed' else 'openloop'}.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    if load.load_model == "open":
        cmd, env = _open_loop_command(endpoint, load, payloads, samples_path, out_dir / f"{stem}.spec.json")
    else:
        cmd, env = _locust_command(endpoint, load, payloads, samples_path, user_class, processes)
    run_time = load.warmup_s + (sum(s for s, _ in load.profile) if load.profile else load.duration_s)
    started = dt.datetime.now(dt.UTC)
    proc = spawn(cmd, log=log, env=env, cpus=cpus)
    try:
        cpu_peak = watch_generator(proc, timeout_s=run_time + 90, after_s=load.warmup_s + 1)
    finally:
        code = stop_group(proc, grace_s=10)
    if load.load_model == "closed":
        _merge_parts(samples_path)
    else:  # the open-loop generator waits actively for send times: use the CPU it spent on work
        cpu_peak = _generator_busy(samples_path, cpu_peak)
    if code != 0 or not samples_path.exists():
        raise LoadTestError(
            f"the load generator failed (exit {code}) for {stem}; last lines of {log}:\n{tail(log)}"
        )
    return result_from_samples(endpoint, load, samples_path, started, cpu_peak, capacity_rps)


WATCH_EVERY_S = 0.5


class GeneratorCpu:
    """The CPU of a load generator's whole process tree: the master and every process below it.

    Locust's ``--processes N`` forks its workers after the master starts, so the tree is looked up
    again on every sample; each process keeps its one psutil.Process, whose ``cpu_percent`` is the
    average since that object's previous call.
    """

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.procs: dict[int, psutil.Process] = {}
        self.n_cpus = _allowed_cpus(root)
        self.discover()

    def discover(self) -> None:
        """Start watching the processes that joined the tree since the last call."""
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in tree:
            if self.procs.get(p.pid) != p:  # new, or a reused pid (Process equality checks start time)
                with contextlib.suppress(psutil.Error):
                    p.cpu_percent(None)  # primes it: its first sample is then a real interval
                    self.procs[p.pid] = p

    def sample(self) -> float:
        """Percent of one core since the previous sample: the busiest process, or the whole tree's
        total spread over the CPUs it may run on, whichever is higher.

        The first catches one process at a full core (one Python process uses at most one); the second
        workers that share too few CPUs (master and two workers pinned to one CPU: ~50% each, 100% in all).
        """
        busy = []
        for pid, p in list(self.procs.items()):
            try:
                busy.append(p.cpu_percent(None))
            except psutil.Error:  # exited
                del self.procs[pid]
        self.discover()
        return max(max(busy, default=0.0), sum(busy) / self.n_cpus)


def _allowed_cpus(p: psutil.Process) -> int:
    try:
        return max(1, len(p.cpu_affinity() or []))
    except (psutil.Error, AttributeError):  # no affinity on this platform
        return psutil.cpu_count() or 1


def watch_generator(proc: subprocess.Popen[bytes], *, timeout_s: float, after_s: float) -> float:
    """Until ``proc`` exits (at most ``timeout_s``): the peak of :meth:`GeneratorCpu.sample`, every
    :data:`WATCH_EVERY_S`, from ``after_s`` seconds on (the warm-up and start-up are left out)."""
    try:
        cpu = GeneratorCpu(psutil.Process(proc.pid))
    except psutil.Error:  # already gone: its exit code tells the caller why
        return 0.0
    peak = 0.0
    began = time.monotonic()
    while proc.poll() is None and time.monotonic() < began + timeout_s:
        time.sleep(WATCH_EVERY_S)
        busy = cpu.sample()
        if time.monotonic() - began > after_s:
            peak = max(peak, busy)
    return peak


def result_from_samples(
    endpoint: Endpoint,
    load: LoadSpec,
    samples_path: Path,
    started: dt.datetime,
    cpu_peak: float = 0.0,
    capacity_rps: float | None = None,
) -> BenchResult:
    """A level's raw samples → its BenchResult: the measured window, percentiles with 95% intervals,
    throughput and the integrity checks (also for samples collected from an in-cluster load test)."""
    window = measured_window(read_samples(samples_path), load.warmup_s)
    n = len(window.samples)
    if n == 0:
        raise LoadTestError(f"no request finished after the {load.warmup_s:.0f}s warm-up in {samples_path}")
    ok_latency = window.samples.latency_ms[window.samples.ok]
    return BenchResult(
        variant_id=endpoint.service.variant.id,
        runtime=endpoint.service.runtime,
        precision=endpoint.service.variant.precision,
        endpoint=endpoint,
        load=load,
        machine=machine_info(),
        started_at=started,
        measured_s=window.seconds,
        n_requests=n,
        n_errors=window.n_errors,
        error_rate=window.n_errors / n,
        throughput_rps=window.throughput,
        latency_ms=latency_stats(ok_latency),
        errors_by_kind=window.errors_by_kind(),
        samples_path=str(samples_path),
        ci_p50_ms=bootstrap_percentile_ci(ok_latency, 50),
        ci_p99_ms=bootstrap_percentile_ci(ok_latency, 99),
        ci_throughput_rps=throughput_ci(window),
        integrity=_integrity(window, load, cpu_peak, capacity_rps),
    )


def _generator_busy(samples_path: Path, fallback: float) -> float:
    """The open-loop generator's own figure: CPU spent on work (not active waiting) per wall second."""
    report = samples_path.with_name(samples_path.name + ".generator.json")
    try:
        return float(json.loads(report.read_text())["busy_percent"])
    except (OSError, ValueError, KeyError):
        return fallback


def _merge_parts(samples_path: Path) -> None:
    """One samples file from the per-process parts Locust's processes wrote."""
    parts = sorted(samples_path.parent.glob(samples_path.name + ".part-*[0-9]"))
    if not parts:
        return
    rows: list[str] = []
    for part in parts:
        lines = part.read_text().splitlines()
        rows += lines[1:]
    header = parts[0].read_text().splitlines()[0]
    atomic_write_text(samples_path, "\n".join([header, *rows]) + "\n")
    for part in parts:
        part.unlink()


GENERATOR_CPU_LIMIT = 90.0
RATE_SHORTFALL = 0.95
LATE_LIMIT = 0.01
MAX_WINDOW_FLAGS = 3
"""Error windows described one by one in the flags; the rest are counted (all are in the result)."""


def _integrity(window: Window, load: LoadSpec, cpu_peak: float, capacity_rps: float | None) -> Integrity:
    stable, windows = stability(window)
    late = late_fraction(window)
    flags = []
    if stable is False:
        flags.append("unstable: throughput or p99 varied by more than 10% across the level's thirds")
    if cpu_peak > GENERATOR_CPU_LIMIT:
        flags.append(f"load generator saturated: its CPU peaked at {cpu_peak:.0f}% of a core")
    target = load.rate_rps if load.load_model == "open" and not load.profile else None
    if target is not None:
        offered = len(window.samples) / window.seconds if window.seconds > 0 else 0.0
        if offered < RATE_SHORTFALL * target:
            flags.append(f"offered {offered:.0f} req/s, below 95% of the {target:g} req/s target")
        if capacity_rps is not None and target > capacity_rps:
            flags.append(
                f"target {target:g} req/s exceeds the generator's measured capacity {capacity_rps:.0f} req/s"
            )
    if late is not None and late > LATE_LIMIT:
        flags.append(f"{late:.1%} of sends left more than 1 ms late")
    failures = error_windows(window)
    flags += [f"errors: {describe_error_window(w)}" for w in failures[:MAX_WINDOW_FLAGS]]
    if len(failures) > MAX_WINDOW_FLAGS:
        flags.append(f"errors: {len(failures) - MAX_WINDOW_FLAGS} more stretches of failed requests")
    return Integrity(
        stable=stable,
        windows=windows,
        target_rps=load.rate_rps if load.load_model == "open" else None,
        late_fraction=late,
        generator_cpu_max=round(cpu_peak, 1),
        generator_capacity_rps=capacity_rps,
        error_windows=tuple(failures),
        flags=tuple(flags),
    )


def _locust_command(
    endpoint: Endpoint,
    load: LoadSpec,
    payloads: Path,
    samples_path: Path,
    user_class: str,
    processes: int = 1,
) -> tuple[list[str], dict[str, str]]:
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
        *(["--processes", str(processes)] if processes > 1 else []),
    ]
    env = dict(
        os.environ,
        OPTISERVE_PAYLOADS=str(payloads),
        OPTISERVE_SAMPLES=str(samples_path),
        OPTISERVE_PATH=endpoint.infer_url.removeprefix(endpoint.url),
        OPTISERVE_RATE=str((load.rate_rps or 1.0) / load.users),
        PYTHONUNBUFFERED="1",
    )
    return cmd, env


def _open_loop_command(
    endpoint: Endpoint, load: LoadSpec, payloads: Path, samples_path: Path, spec_path: Path
) -> tuple[list[str], dict[str, str]]:
    if load.rate_rps is None and not load.profile:
        raise LoadTestError(f"open-loop level of {load.scenario} has neither rate_rps nor a profile")
    first_rate = load.profile[0][1] if load.profile else load.rate_rps
    segments = [(load.warmup_s, first_rate), *(load.profile or [(load.duration_s, load.rate_rps)])]
    spec = {
        "host": endpoint.service.host,
        "port": endpoint.service.port,
        "path": endpoint.infer_url.removeprefix(endpoint.url),
        "payloads": str(payloads),
        "samples": str(samples_path),
        "segments": [[float(a), float(b)] for a, b in segments if a > 0],
        "arrival": load.arrival,
        "users": load.users,
        "seed": 0,
    }
    atomic_write_text(spec_path, json.dumps(spec, indent=2))
    cmd = [sys.executable, "-m", "optiserve.loadtests.openloop", "--spec", str(spec_path)]
    return cmd, dict(os.environ, PYTHONUNBUFFERED="1")


def generator_capacity(
    out_dir: Path, *, server_cpus: frozenset[int] | None, cpus: frozenset[int] | None
) -> float:
    """Requests/s the open-loop generator completes against a null endpoint on this machine (2 s at
    an offered 20,000 req/s), measured once before a run's open-loop levels."""
    from optiserve.procs import free_port

    port = free_port()
    server_log = out_dir / "null-server.log"
    server = spawn(
        [sys.executable, "-m", "optiserve.loadtests.null_server", str(port)], log=server_log, cpus=server_cpus
    )
    try:
        deadline = time.monotonic() + 10
        while (
            b"ready" not in (server_log.read_bytes() if server_log.exists() else b"")
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        payloads = out_dir / "null-payloads.jsonl"
        body = b'{"inputs":[]}'
        atomic_write_text(
            payloads, json.dumps({"body": base64.b64encode(body).decode(), "header_length": len(body)}) + "\n"
        )
        samples = out_dir / "null.samples.csv"
        spec = {
            "host": "127.0.0.1",
            "port": port,
            "path": "/null",
            "payloads": str(payloads),
            "samples": str(samples),
            "segments": [[2.0, 20000.0]],
            "arrival": "constant",
            "users": 64,
        }
        spec_path = out_dir / "null.spec.json"
        atomic_write_text(spec_path, json.dumps(spec))
        gen = spawn(
            [sys.executable, "-m", "optiserve.loadtests.openloop", "--spec", str(spec_path)],
            log=out_dir / "null-generator.log",
            cpus=cpus,
        )
        gen.wait(timeout=120)
        window = measured_window(read_samples(samples), 0.0)
        return window.throughput
    finally:
        stop_group(server, grace_s=2)
