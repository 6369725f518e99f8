"""In-process latency of a loaded runtime: batch-1 percentiles and large-batch throughput.

Warm-up iterations are run and discarded; each measurement runs for a fixed time budget (at least a
minimum number of iterations), so slow and fast variants get comparable sample counts per second.
"""

from __future__ import annotations

import time

import numpy as np

from optiserve.services.runtimes.base import Runtime
from optiserve.types import MicroBench


def _timed(fn: object, x: np.ndarray, budget_s: float, min_iters: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn(x)  # type: ignore[operator]
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_iters or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn(x)  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def measure(
    runtime: Runtime, sample: np.ndarray, *, threads: int, batch: int = 32, budget_s: float = 2.0
) -> MicroBench:
    """``sample`` is one input sample (no batch axis); the runtime must be loaded."""
    one = np.ascontiguousarray(sample[None])
    many = np.ascontiguousarray(np.repeat(sample[None], batch, axis=0))
    t1 = _timed(runtime.infer_any, one, budget_s, min_iters=30, warmup=10) * 1000.0
    tb = _timed(runtime.infer_any, many, budget_s, min_iters=5, warmup=2)
    return MicroBench(
        threads=threads,
        batch1_n=len(t1),
        batch1_p50_ms=float(np.percentile(t1, 50)),
        batch1_p99_ms=float(np.percentile(t1, 99)),
        batch=batch,
        batch_throughput=float(batch / np.median(tb)),
    )
