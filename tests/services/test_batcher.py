"""The shared adaptive batcher (our own asyncio dispatcher), in an event loop of its own."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from optiserve.errors import ServingError
from optiserve.services.batcher import Batcher


class Recorder:
    """A real (if simple) model: row sums, recording each batch's shape; optionally slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.shapes.append(batch.shape)
        time.sleep(self.delay_s)
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)


async def gather(batcher: Batcher, parts: list[np.ndarray]) -> list[np.ndarray]:
    return await asyncio.gather(*(batcher(p) for p in parts))


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows() -> None:
    model = Recorder(delay_s=0.02)
    batcher = Batcher(model, max_batch_size=8, max_latency_ms=10_000)
    parts = [np.full((1, 4), float(i), dtype=np.float32) for i in range(24)]
    results = asyncio.run(gather(batcher, parts))
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, [[4.0 * i]])
    assert sum(s[0] for s in model.shapes) == 24  # every sample ran once
    assert max(s[0] for s in model.shapes) > 1  # and some ran together
    assert max(s[0] for s in model.shapes) <= 8


def test_a_request_larger_than_max_batch_size_is_split_and_reassembled() -> None:
    model = Recorder()
    batcher = Batcher(model, max_batch_size=4, max_latency_ms=10_000)
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    (result,) = asyncio.run(gather(batcher, [x]))
    np.testing.assert_array_equal(result, x.sum(axis=1, keepdims=True))
    assert max(s[0] for s in model.shapes) <= 4


def test_different_lengths_are_padded_when_the_model_allows_it() -> None:
    model = Recorder(delay_s=0.05)
    batcher = Batcher(model, max_batch_size=8, max_latency_ms=10_000, pad_value=0)
    parts = [np.ones((1, n), dtype=np.int64) for n in (3, 5, 2, 5, 4, 1)]
    results = asyncio.run(gather(batcher, parts))
    assert [int(r[0, 0]) for r in results] == [3, 5, 2, 5, 4, 1]  # padding with 0 changed no sum
    assert any(len(s) == 2 and s[0] > 1 for s in model.shapes)


def test_different_shapes_run_apart_when_padding_is_not_allowed() -> None:
    model = Recorder(delay_s=0.05)
    batcher = Batcher(model, max_batch_size=8, max_latency_ms=10_000)
    parts = [np.ones((1, n), dtype=np.float32) for n in (3, 5, 3, 5, 3)]
    results = asyncio.run(gather(batcher, parts))
    assert [float(r[0, 0]) for r in results] == [3, 5, 3, 5, 3]
    assert all(len({s[1]}) == 1 for s in model.shapes)


def test_an_overloaded_batcher_sheds_with_a_503_that_says_what_to_change() -> None:
    model = Recorder(delay_s=0.2)
    batcher = Batcher(model, max_batch_size=2, max_latency_ms=50)

    async def flood() -> list[object]:
        return await asyncio.gather(
            *(batcher(np.ones((1, 2), dtype=np.float32)) for _ in range(30)), return_exceptions=True
        )

    outcomes = asyncio.run(flood())
    shed = [o for o in outcomes if isinstance(o, ServingError)]
    assert shed, "30 requests of 0.2 s against a 50 ms deadline must shed some"
    assert shed[0].http_status == 503
    assert "max_latency_ms=50" in shed[0].one_line()
    assert not [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, ServingError)]


def test_a_shed_request_says_when_to_retry_from_the_queue_it_leaves_behind() -> None:
    """Retry-After: the predicted time to run what is still queued, whole seconds, at least 1. Shed
    oldest first, each leaves a shorter queue behind, so the values fall to 1."""
    model = Recorder(delay_s=0.2)
    batcher = Batcher(model, max_batch_size=2, max_latency_ms=50)

    async def flood() -> list[object]:
        return await asyncio.gather(
            *(batcher(np.ones((1, 2), dtype=np.float32)) for _ in range(30)), return_exceptions=True
        )

    waits = [o.retry_after_s for o in asyncio.run(flood()) if isinstance(o, ServingError)]
    assert waits and all(isinstance(w, int) and w >= 1 for w in waits), waits
    # The first shed leaves ~27 samples: 14 batches of 2 at the fitted ~0.4 s a batch ≈ 6 s.
    assert 4 <= waits[0] <= 8, waits
    assert waits == sorted(waits, reverse=True) and waits[-1] == 1, waits


def test_right_after_an_inline_run_the_caller_is_asked_to_look_for_company() -> None:
    """An inline run blocks the loop; requests read meanwhile are not yet counted by the caller, so
    for as long as that run took the batcher says company may be hidden (ServingCore then yields
    once before trusting its count)."""
    batcher = Batcher(Recorder(delay_s=0.005), max_batch_size=4, max_latency_ms=10_000)
    one = np.ones((1, 2), dtype=np.float32)

    async def scenario() -> list[bool]:
        await batcher(one, alone=True)  # on the inference thread: times it
        seen = [batcher.may_hide_company(one)]
        await batcher(one, alone=True)  # inline
        seen.append(batcher.may_hide_company(one))
        seen.append(batcher.may_hide_company(np.ones((2, 2), dtype=np.float32)))  # never inline
        await asyncio.sleep(0.02)  # a lone client's next request comes later than the run took
        seen.append(batcher.may_hide_company(one))
        return seen

    assert asyncio.run(scenario()) == [False, True, False, False]


def test_without_batching_every_request_runs_alone() -> None:
    model = Recorder(delay_s=0.01)
    batcher = Batcher(model, max_batch_size=8, max_latency_ms=10_000, enabled=False)
    parts = [np.full((1, 2), float(i), dtype=np.float32) for i in range(6)]
    results = asyncio.run(gather(batcher, parts))
    assert [float(r[0, 0]) for r in results] == [2.0 * i for i in range(6)]
    assert all(s[0] == 1 for s in model.shapes)


def test_a_failing_model_fails_the_requests_not_the_batcher() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("kaput")

    batcher = Batcher(broken, max_batch_size=4, max_latency_ms=10_000)
    with pytest.raises(RuntimeError, match="kaput"):
        asyncio.run(gather(batcher, [np.ones((1, 2), dtype=np.float32)]))


def test_a_lone_request_after_a_burst_is_dispatched_at_once() -> None:
    """BentoML's own controller, once it refits its model (every 5 s; here at once), held each request
    after a burst back for the burst's average queue wait (~0.2 s here) and kept doing so; this one
    sends it as soon as the runtime is free."""
    model = Recorder(delay_s=0.02)
    batcher = Batcher(model, max_batch_size=2, max_latency_ms=10_000)
    waits: list[float] = []

    async def burst_then_alone() -> None:
        await gather(batcher, [np.ones((1, 2), dtype=np.float32) for _ in range(40)])
        assert batcher.fit_latency_model() is not None
        for _ in range(5):
            started = time.perf_counter()
            await batcher(np.ones((1, 2), dtype=np.float32))
            waits.append(time.perf_counter() - started - model.delay_s)

    asyncio.run(burst_then_alone())
    assert max(s[0] for s in model.shapes) == 2  # the burst ran as batches
    assert max(waits) < 0.1, f"lone requests waited {[round(w, 3) for w in waits]} s beyond inference"


def test_batches_grow_with_the_queue_while_the_runtime_is_busy() -> None:
    model = Recorder(delay_s=0.05)
    batcher = Batcher(model, max_batch_size=8, max_latency_ms=10_000)
    asyncio.run(gather(batcher, [np.ones((1, 2), dtype=np.float32) for _ in range(17)]))
    # The first finds the runtime free and runs at once; the others queue behind it meanwhile.
    assert [s[0] for s in model.shapes] == [1, 8, 8]


@pytest.mark.parametrize(
    ("delay_s", "alone", "inline"), [(0.002, True, True), (0.04, True, False), (0.002, False, False)]
)
def test_a_lone_fast_request_runs_on_the_event_loop_thread_only_when_nothing_else_is_in_flight(
    delay_s: float, alone: bool, inline: bool
) -> None:
    """Inline saves two thread hand-offs at concurrency 1, but blocks the loop: with other requests in
    flight (still being read) it would serialize them all and nothing would ever batch."""
    threads: list[str] = []

    def model(batch: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        time.sleep(delay_s)
        return batch

    batcher = Batcher(model, max_batch_size=4, max_latency_ms=10_000)

    async def three_alone() -> None:
        for _ in range(3):
            await batcher(np.ones((1, 2), dtype=np.float32), alone=alone)

    asyncio.run(three_alone())
    main = threading.main_thread().name
    assert threads[0] != main, "the first lone request has no timing yet: it runs on the inference thread"
    assert [t == main for t in threads[1:]] == [inline, inline], threads


def test_batches_stop_at_the_calibrated_size_with_the_highest_throughput() -> None:
    """A runtime whose time per sample grows beyond 2 samples (as efficientnet-lite0 on one CPU core):
    once calibrated, a saturated batcher forms batches of 2, not of max_batch_size."""

    class Superlinear(Recorder):
        def __call__(self, batch: np.ndarray) -> np.ndarray:
            time.sleep(0.004 if len(batch) <= 2 else 0.004 * len(batch))
            return super().__call__(batch)

    model = Superlinear()
    batcher = Batcher(model, max_batch_size=8, max_latency_ms=10_000)

    async def calibrate_then_flood() -> dict[int, float]:
        sizes = await batcher.calibrate(np.ones((1, 2), dtype=np.float32), runs=2)
        model.shapes.clear()
        await gather(batcher, [np.ones((1, 2), dtype=np.float32) for _ in range(20)])
        return sizes

    sizes = asyncio.run(calibrate_then_flood())
    assert sorted(sizes) == [1, 2, 4, 8]
    assert batcher.preferred_batch_size == 2
    assert [s[0] for s in model.shapes] == [1] + [2] * 9 + [1]


def test_a_request_larger_than_the_preferred_size_still_runs_whole() -> None:
    model = Recorder()
    batcher = Batcher(model, max_batch_size=8, max_latency_ms=10_000)
    batcher._size_s = {1: 0.001, 2: 0.001, 4: 1.0, 8: 2.0}  # prefer 2

    async def busy_then_four() -> list[np.ndarray]:
        parts = [np.ones((1, 3), dtype=np.float32), np.ones((4, 3), dtype=np.float32)]
        return await asyncio.wait_for(gather(batcher, parts), timeout=10)  # it used to wait forever

    _, second = asyncio.run(busy_then_four())
    assert second.shape == (4, 1) and float(second[0, 0]) == 3.0
    assert (4, 3) in model.shapes


def test_nothing_imports_bentoml_internals() -> None:
    """The batcher used to subclass BentoML's private CorkDispatcher, which pinned bentoml to one
    version; only BentoML's public API may be used now (pyproject gives bentoml a range)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(path.relative_to(root))
        for folder in ("optiserve", "services", "optimizers", "loadtests", "deploy")
        for path in (root / folder).rglob("*.py")
        if "bentoml._internal" in path.read_text() or "_bentoml_impl" in path.read_text()
    ]
    assert not offenders, offenders
    pyproject = (root / "pyproject.toml").read_text()
    assert '"bentoml>=' in pyproject and "bentoml==" not in pyproject
