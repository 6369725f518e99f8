"""The one adaptive batcher every protocol goes through: a plain asyncio dispatcher of our own.

One batcher per server, with the ServiceSpec's ``max_batch_size`` and ``max_latency_ms``, shared by
every endpoint, so requests from different protocols batch together.

It is work-conserving: one batch in flight at a time, and the moment the runtime frees up whatever is
queued (up to ``max_batch_size`` samples) goes out as the next batch; a request that finds the runtime
free and nothing queued runs at once. Batches therefore grow with the load (requests queue while a batch
runs, as in Triton's dynamic batcher with no queue delay) and a lone request never waits for company.
(BentoML's own dispatcher, used before, polled every millisecond while a batch ran and held a lone
request back for the average queue wait of its last 50 batches: 275 ms a request at 1 user after a
32-user burst, 13 ms before it, with efficientnet-lite0.)

Batches are formed up to the *preferred* batch size: the one with the highest throughput, timed for
1, 2, 4, … ``max_batch_size`` samples at warm-up (:meth:`Batcher.calibrate`), since on CPUs a larger
batch is not always cheaper per sample.

Load shedding: as the runtime frees up, while more than one request waits, the oldest is refused (HTTP
503) if its wait plus the predicted time of the next batch exceeds ``max_latency_ms``. The prediction is
a least-squares fit ``seconds = a·samples + b`` over the last :data:`MODEL_WINDOW` measured batches
(:class:`BatchTimeModel`), refitted after every batch.

What else it does:

- queue wait (enqueue → dispatch, per request) and batch size/inference time go to the metrics contract;
- a request larger than ``max_batch_size`` is split into batches of at most that size and reassembled;
- samples of different lengths on a dynamic axis (token ids) are padded to the longest when the model
  declares a pad value, and otherwise run as separate groups of equal shape, so batching never
  changes a result;
- a shed request raises :class:`~optiserve.errors.ServingError` (HTTP 503) with what to change, and
  when to retry: the predicted time to run what is still queued (:meth:`Batcher.drain_s`), in whole
  seconds, at least 1 (the response's ``Retry-After``);
- a failing runtime fails the requests of that batch, never the batcher.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from optiserve.errors import ServingError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np


InferFn = Callable[["np.ndarray"], "np.ndarray"]
INLINE_MAX_S = 0.025
"""A lone one-sample request on an idle runtime runs on the event loop's thread instead of the
inference thread when the previous one took less than this: that saves two thread wake-ups (~0.2 ms a
request measured on a 2-vCPU VM, 1.5% of efficientnet-lite0's 12 ms there) and blocks the loop (health
checks, metrics, other connections' reads) for about this long at most. The first lone request always
runs on the inference thread."""
MODEL_WINDOW = 100
"""Batches the batch-time model is fitted to (the most recent ones, so it follows a changing machine)."""


def retry_after(seconds: float) -> int:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1 (the header takes no fractions)."""
    return max(1, math.ceil(seconds))


class BatchObserver(Protocol):
    """Where measured batches and queue waits go (the metrics contract, statistics)."""

    def batch(self, size: int, inference_s: float) -> None: ...

    def queue_waits(self, waits_s: list[float]) -> None: ...


class BatchTimeModel:
    """Seconds a batch of ``n`` samples takes, ``a·n + b``, fitted by least squares to measured batches.

    Running sums over a sliding window keep each update O(1). With one batch size only, ``b`` cannot be
    told from ``a``, so the fit is proportional (``b = 0``); both stay non-negative. Before any batch it
    predicts 0 (nothing is shed before the warm-up measured the runtime).
    """

    def __init__(self, window: int = MODEL_WINDOW) -> None:
        self._points: deque[tuple[int, float]] = deque()
        self._window = window
        self._sn = self._ss = self._snn = self._sns = 0.0
        self.a = self.b = 0.0

    def observe(self, n: int, seconds: float) -> None:
        self._points.append((n, seconds))
        self._add(n, seconds, 1)
        if len(self._points) > self._window:
            self._add(*self._points.popleft(), -1)
        self._fit()

    def predict(self, n: int) -> float:
        return self.a * n + self.b

    def _add(self, n: int, s: float, sign: int) -> None:
        self._sn += sign * n
        self._ss += sign * s
        self._snn += sign * n * n
        self._sns += sign * n * s

    def _fit(self) -> None:
        k = len(self._points)
        spread = k * self._snn - self._sn * self._sn
        if spread > 1e-9 * max(1.0, self._snn):
            a = (k * self._sns - self._sn * self._ss) / spread
            b = (self._ss - a * self._sn) / k
        else:
            a, b = (self._ss / self._sn if self._sn else 0.0), 0.0
        if a < 0:  # noise on a flat curve: the mean time, whatever the size
            a, b = 0.0, self._ss / k
        if b < 0:
            a, b = (self._ss / self._sn if self._sn else 0.0), 0.0
        self.a, self.b = a, b


@dataclass
class _Job:
    data: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_latency_ms: int,
        enabled: bool = True,
        pad_value: float | None = None,
        metrics: BatchObserver | None = None,
    ) -> None:
        self._infer = infer
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.shedding = True
        """Off while the service warms up: its own burst of warm-up requests is never refused."""
        self.pad_value = pad_value
        self.metrics = metrics
        self.model = BatchTimeModel()
        self._queue: deque[_Job] = deque()
        self._queued_samples = 0
        self._busy = False
        self._lone_s = float("inf")
        """How long the last lone one-sample request took (none yet: never inline)."""
        self._inline_end = 0.0
        """When the last request run on the event loop's thread finished (perf_counter)."""
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # running batches (a reference keeps each alive)
        self._size_s: dict[int, float] = {}
        """Calibrated seconds per batch, by batch size (see :meth:`calibrate`)."""

    @property
    def preferred_batch_size(self) -> int:
        """The batch size with the highest measured throughput (max_batch_size until calibrated)."""
        if not self._size_s:
            return self.max_batch_size
        return max(self._size_s, key=lambda n: n / self._size_s[n])

    async def calibrate(self, sample: np.ndarray, runs: int = 5) -> dict[int, float]:
        """Time batches of 1, 2, 4, … ``max_batch_size`` copies of ``sample`` on the runtime (at warm-up,
        before clients arrive) and prefer the size that serves the most samples a second.

        On CPUs the time per sample is not always falling with the batch size: efficientnet-lite0 on
        one core serves 171/s at batch 2 but 144/s at batch 8, so a saturated server that always
        dispatched max_batch_size would serve 16% less than it can. Batches are then formed only up to
        the preferred size (a queued request never waits for company either way). The choice is made
        once: following it with live batches made it flap between near-equal sizes (the sizes not
        chosen are never measured again), and a machine that slows down slows every size alike.
        """
        import numpy as np

        sizes = sorted(
            {
                *(2**k for k in range(self.max_batch_size.bit_length()) if 2**k <= self.max_batch_size),
                self.max_batch_size,
            }
        )
        for n in sizes:
            batch = np.repeat(sample[:1], n, axis=0)
            await self._in_thread(self._infer, batch)  # the first run of a shape is slow
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                await self._in_thread(self._infer, batch)
                times.append(time.perf_counter() - started)
            self._size_s[n] = float(np.median(times))
            self.model.observe(n, self._size_s[n])
        return dict(self._size_s)

    def _measured(self, n: int, seconds: float) -> None:
        self.model.observe(n, seconds)

    def fit_latency_model(self) -> tuple[float, float] | None:
        """The batch-time model load shedding uses (seconds = a·samples + b), or None before any batch."""
        if not self.model._points:
            return None
        return self.model.a, self.model.b

    def may_hide_company(self, batch: np.ndarray) -> bool:
        """Whether ``batch`` would run inline right after an inline run that ended less than that run's
        own duration ago. Requests that arrived while that run blocked the loop are then read, their
        tasks scheduled but not started, so a caller's in-flight count does not see them yet (a lone
        client's next request comes a round trip later; a queue's, at once)."""
        return (
            self.enabled
            and len(batch) == 1
            and not self._busy
            and not self._queue
            and self._lone_s < INLINE_MAX_S
            and time.perf_counter() - self._inline_end < self._lone_s
        )

    async def __call__(self, batch: np.ndarray, *, alone: bool = False) -> np.ndarray:
        """Infer one request's samples (first axis), batched with whatever else is queued.

        ``alone``: the caller knows no other request is in flight (not even being read), so a fast
        one-sample request may run on the event loop's thread. Running there blocks the loop, so no
        other request can even be read meanwhile: under load that would serialize every request and
        defeat batching (measured: 132 req/s with every request inline at 32 clients)."""
        if not self.enabled:
            out: np.ndarray = await self._in_thread(self._run_one, batch)
            return out
        if len(batch) > self.max_batch_size:
            import numpy as np

            step = self.max_batch_size
            parts = await asyncio.gather(*(self(batch[i : i + step]) for i in range(0, len(batch), step)))
            return np.concatenate(parts)
        if not self._busy and not self._queue:
            return await self._run_alone(batch, inline_ok=alone)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(batch, future))
        self._queued_samples += len(batch)
        self._dispatch()
        return await future

    async def _run_alone(self, batch: np.ndarray, inline_ok: bool) -> np.ndarray:
        """The batch the dispatcher would form from this request alone, without the queue's hand-offs;
        a one-sample request runs on the event loop's thread when the last one took < INLINE_MAX_S."""
        self._busy = True
        if self.metrics is not None:
            self.metrics.queue_waits([0.0])
        started = time.perf_counter()
        single = len(batch) == 1
        try:
            if single and inline_ok and self._lone_s < INLINE_MAX_S:
                (result,) = self._run_parts([batch])
                self._inline_end = time.perf_counter()
            else:
                (result,) = await self._in_thread(self._run_parts, [batch])
            took = time.perf_counter() - started
            if single:
                self._lone_s = took
            self._measured(len(batch), took)
            return result
        finally:
            self._busy = False
            self._dispatch()

    def _dispatch(self) -> None:
        """If the runtime is free, shed what cannot make its deadline and start the next batch."""
        if self._busy:
            return
        self._shed_late()
        jobs: list[_Job] = []
        samples = 0
        limit = self.preferred_batch_size
        while self._queue and (not jobs or samples + len(self._queue[0].data) <= limit):
            job = self._pop()
            if job.future.done():  # its client went away
                continue
            jobs.append(job)
            samples += len(job.data)
        if not jobs:
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run_jobs(jobs, samples))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pop(self) -> _Job:
        job = self._queue.popleft()
        self._queued_samples -= len(job.data)
        return job

    def _shed_late(self) -> None:
        if not self.shedding:
            return
        now = time.perf_counter()
        deadline = self.max_latency_ms / 1000
        while len(self._queue) > 1:
            oldest = self._queue[0]
            batch = min(self._queued_samples, self.max_batch_size)
            if now - oldest.enqueued + self.model.predict(batch) < deadline:
                break
            self._pop()
            if not oldest.future.done():
                oldest.future.set_exception(self._overloaded())

    async def _run_jobs(self, jobs: list[_Job], samples: int) -> None:
        started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.queue_waits([started - job.enqueued for job in jobs])
        try:
            results = await self._in_thread(self._run_parts, [job.data for job in jobs])
        except Exception as e:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
        else:
            self._measured(samples, time.perf_counter() - started)
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
        finally:
            self._busy = False
            self._dispatch()

    def drain_s(self) -> float:
        """Predicted seconds until what is queued now has run, in batches of the preferred size."""
        size = self.preferred_batch_size
        batches = -(-self._queued_samples // size)
        return batches * self.model.predict(size)

    def _overloaded(self) -> ServingError:
        return ServingError(
            f"server overloaded: the batcher could not answer within max_latency_ms={self.max_latency_ms}",
            hint="retry later, add replicas, or raise batching.max_latency_ms",
            retry_after_s=retry_after(self.drain_s()),
        )

    async def _in_thread(self, fn: Callable[[Any], Any], arg: object) -> Any:
        # One batch runs at a time, so one dedicated thread serves; run_in_executor costs ~30 µs less
        # per hand-off than anyio's worker pool.
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optiserve-infer")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)

    def _run_one(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        out = self._infer(batch)
        if self.metrics is not None:
            self.metrics.batch(len(batch), time.perf_counter() - started)
            self.metrics.queue_waits([0.0])
        return out

    def _run_parts(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        started = time.perf_counter()
        groups = self._groups(parts)
        outs: list[np.ndarray | None] = [None] * len(parts)
        for members, batch in groups:
            result = self._infer(batch)
            start = 0
            for k in members:
                n = len(parts[k])
                outs[k] = result[start : start + n]
                start += n
        if self.metrics is not None:
            self.metrics.batch(sum(len(p) for p in parts), time.perf_counter() - started)
        return [np.ascontiguousarray(o) for o in outs if o is not None]

    def _groups(self, parts: list[np.ndarray]) -> list[tuple[list[int], np.ndarray]]:
        """Parts that can run as one array: same sample shape, or padded to one when allowed."""
        import numpy as np

        shapes = {p.shape[1:] for p in parts}
        if len(shapes) == 1:
            return [(list(range(len(parts))), np.concatenate(parts) if len(parts) > 1 else parts[0])]
        if self.pad_value is not None and len({len(s) for s in shapes}) == 1:
            target = tuple(max(dims) for dims in zip(*shapes, strict=True))
            padded = [
                np.pad(
                    p,
                    [(0, 0)] + [(0, t - d) for t, d in zip(target, p.shape[1:], strict=True)],
                    constant_values=self.pad_value,
                )
                for p in parts
            ]
            return [(list(range(len(parts))), np.concatenate(padded))]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, p in enumerate(parts):
            by_shape.setdefault(p.shape[1:], []).append(k)
        return [(members, np.concatenate([parts[k] for k in members])) for members in by_shape.values()]
