"""The load generator's saturation check watches its whole process tree (Locust's master and the worker
processes it forks), against real processes and a real server."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from optiserve.loadtests.runner import GENERATOR_CPU_LIMIT, run_level, watch_generator, write_payloads
from optiserve.loadtests.scenarios.closed_loop import ClosedLoop, ClosedLoopConfig
from optiserve.procs import spawn, stop_group
from optiserve.types import Endpoint, Variant
from tests.conftest import null_server, random_inputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs: generator and server apart"),
]

ATTEMPTS = 3
"""Other processes on this shared machine can only take CPU from the generator, never lend it some: a
run that stays under the threshold is tried again, and one that passes it cannot be a false pass."""


def cpus_apart() -> tuple[frozenset[int], frozenset[int]]:
    """(one CPU for the generator, another for the server): the generator gets the least busy one,
    since these tests need it to have a whole CPU on a machine that others share."""
    allowed = sorted(os.sched_getaffinity(0))
    busy = psutil.cpu_percent(interval=0.5, percpu=True)
    generator = min(allowed, key=lambda c: busy[c])
    server = min((c for c in allowed if c != generator), key=lambda c: busy[c])
    return frozenset({generator}), frozenset({server})


# A generator-like tree: an idle master that forks busy workers a second after it starts (as Locust's
# --processes does), then reports its own CPU time so the test can show the master itself stayed idle.
IDLE_MASTER_BUSY_WORKERS = textwrap.dedent(
    """
    import os, time

    time.sleep(1.0)
    workers = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # a worker: a full core's worth of work for 4 s
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                pass
            os._exit(0)
        workers.append(pid)
    for pid in workers:
        os.waitpid(pid, 0)
    print(f"master cpu_s {time.process_time():.3f}", flush=True)
    """
)


def test_idle_master_with_busy_workers_counts_as_saturated(
    tmp_path: Path, figures: Callable[[str, object], None]
) -> None:
    """Watching the master alone would read ~0%: the peak must come from the workers it forked later."""
    peaks = []
    for attempt in range(ATTEMPTS):
        log = tmp_path / f"tree-{attempt}.log"
        generator_cpu, _ = cpus_apart()
        proc = spawn([sys.executable, "-c", IDLE_MASTER_BUSY_WORKERS], log=log, cpus=generator_cpu)
        try:
            peaks.append(watch_generator(proc, timeout_s=30, after_s=1.0))
        finally:
            code = stop_group(proc, grace_s=5)
        assert code == 0, log.read_text()
        master_cpu_s = float(log.read_text().split("master cpu_s")[1])
        assert master_cpu_s < 0.5, master_cpu_s  # the master itself never came near a core over ~5 s
        if peaks[-1] > GENERATOR_CPU_LIMIT:
            break
    figures("generator CPU: idle master, 2 busy workers", f"{peaks[-1]:.0f}% (master {master_cpu_s:.2f} s)")
    # Two workers pinned to one CPU: each ~50% of a core, together the whole CPU the generator has.
    assert peaks[-1] > GENERATOR_CPU_LIMIT, peaks


@pytest.fixture
def cpus() -> tuple[frozenset[int], frozenset[int]]:
    return cpus_apart()


@pytest.fixture
def null_endpoint(
    tmp_path: Path, onnx_source: Variant, variants_workdir: Path, cpus: tuple[frozenset[int], frozenset[int]]
) -> Iterator[Endpoint]:
    """The null server (answers at once, so the generator is the bottleneck) posing as a served variant."""
    with null_server(onnx_source, variants_workdir, tmp_path / "null.log", cpus=cpus[1]) as endpoint:
        yield endpoint


def test_locust_workers_saturating_their_cpu_are_flagged(
    null_endpoint: Endpoint,
    cpus: tuple[frozenset[int], frozenset[int]],
    tmp_path: Path,
    figures: Callable[[str, object], None],
) -> None:
    """64 users with no think time against the null server, Locust's master and 2 workers on one CPU:
    the workers use all of it (~50% each, the master little), and the level says so."""
    payloads = write_payloads(tmp_path / "payloads.jsonl", random_inputs(4), "input")
    config = ClosedLoopConfig(concurrency=(64,), duration_s=3, warmup_s=1)
    (load,) = ClosedLoop(config).levels()
    peaks: list[float | None] = []
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"samples-{attempt}"
        result = run_level(null_endpoint, load, payloads, out, cpus=cpus[0], processes=2)
        assert result.n_requests > 0 and result.n_errors == 0
        peaks.append(result.integrity.generator_cpu_max)
        saturated = [f for f in result.integrity.flags if f.startswith("load generator saturated")]
        if saturated:
            break
    figures("generator CPU: Locust, 2 workers on 1 CPU", f"{peaks[-1]}%")
    assert saturated, (peaks, result.integrity.flags)
    assert result.integrity.generator_cpu_max is not None
    assert result.integrity.generator_cpu_max > GENERATOR_CPU_LIMIT
