"""The one adaptive batcher every protocol goes through: BentoML's own (``CorkDispatcher``).

BentoML's ``@bentoml.api(batchable=True)`` builds a dispatcher per API inside its HTTP layer, so two
endpoints (the native one and the Open Inference Protocol) would get two queues and never batch
together. Here one dispatcher, with the ServiceSpec's ``max_batch_size`` and ``max_latency_ms``, is
shared by every endpoint. Its controller is work-conserving (a batch of whatever is queued goes out as
soon as the runtime is free, one batch in flight at a time, so batches grow with the load and a lone
request never waits); load shedding when a request cannot meet ``max_latency_ms`` uses BentoML's batch
time model (see ``MeasuredDispatcher``).

What it adds:

- queue wait (enqueue → dispatch, per request) and batch size/inference time go to the metrics contract;
- a request larger than ``max_batch_size`` is split by the dispatcher and reassembled;
- samples of different lengths on a dynamic axis (token ids) are padded to the longest when the model
  declares a pad value, and otherwise run as separate groups of equal shape, so batching never
  changes a result;
- a shed request raises :class:`~optiserve.errors.ServingError` (HTTP 503) with what to change.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from optiserve.errors import ServingError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from optiserve.metrics import ServiceMetrics

InferFn = Callable[["np.ndarray"], "np.ndarray"]
INLINE_MAX_S = 0.025
"""A lone one-sample request on an idle runtime runs on the event loop's thread instead of the
inference thread when the previous one took less than this: that saves two thread wake-ups (~0.2 ms a
request measured on a 2-vCPU VM, 1.5% of efficientnet-lite0's 12 ms there) and blocks the loop (health
checks, metrics, other connections' reads) for about this long at most. The first lone request always
runs on the inference thread."""


def _dispatcher_class() -> type:
    import asyncio
    import logging

    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    log = logging.getLogger("optiserve.batcher")

    class MeasuredDispatcher(CorkDispatcher):  # type: ignore[misc,type-arg]
        """BentoML's CorkDispatcher with a work-conserving controller that reports queue waits.

        BentoML's own controller (1.4) polls every millisecond while a batch runs, and when the runtime
        is free it holds a lone request back for as long as the average queue wait of the last 50
        batches. Under saturation that average is the time requests spent behind the running batch,
        so once the load drops every request is held that long, and the wait it then observes keeps it
        there (measured with efficientnet-lite0: 275 ms a request at 1 user after a 32-user burst,
        13 ms before it). This controller dispatches whatever is queued, up to ``max_batch_size``, the
        moment the runtime is free and is woken by the batch finishing rather than by a timer. Batches
        still grow with the load, since requests queue while a batch runs (Triton's dynamic batcher
        with no queue delay does the same). Load shedding is BentoML's rule, checked each time the
        runtime frees up (BentoML checked every millisecond, so a doomed request now hears its 503 when
        the running batch ends): while more than one request waits, the oldest is refused (503) if its
        wait plus the fitted time of a batch (``o_a·n + o_b``, learned from measured batches) exceeds
        ``max_latency``.
        """

        on_dispatch: Callable[[list[float]], None] | None = None
        run_inline: Callable[[Sequence[Any]], list[Any]] | None = None
        """The batch callback's synchronous body, for :meth:`run_if_idle`."""
        lone_s = float("inf")
        """How long the last lone one-sample request took (none yet: never inline)."""

        @property
        def _busy(self) -> Any:
            """BentoML's semaphore (one batch in flight), untyped."""
            return self._sema

        def _can_dispatch(self) -> bool:
            return bool(self._queue) and not self._busy.is_locked()

        def _shed_late(self) -> None:
            now = time.time()
            a, b = self.optimizer.o_a, self.optimizer.o_b
            while len(self._queue) > 1:
                batch = min(len(self._queue), self.max_batch_size)
                if now - self._queue[0].enqueue_time + a * batch + b < self.max_latency:
                    break
                self._queue.popleft().future.cancel()

        async def controller(self) -> None:
            while True:
                try:
                    async with self._wake_event:
                        await self._wake_event.wait_for(self._can_dispatch)
                    self._shed_late()
                    self._busy.acquire()
                    inputs_info = tuple(self._get_inputs())
                    self._loop.create_task(self.outbound_call(inputs_info))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("the batcher could not dispatch a batch")

        async def run_if_idle(self, data: Any) -> tuple[bool, Any]:
            """``(True, result)`` after running ``data`` as a batch of its own, when the runtime is
            free and nothing is queued (the batch the controller would form, without the hand-offs
            through the queue and the controller task); ``(False, None)`` otherwise. A one-sample
            request runs on the event loop's thread when the previous one took under ``INLINE_MAX_S``."""
            if self._queue or self._busy.is_locked() or self.get_batch_size(data) > self.max_batch_size:
                return False, None
            if self._controller is None:
                self._controller = self._loop.create_task(self.controller())  # type: ignore[assignment]
            self._busy.acquire()
            if self.on_dispatch is not None:
                self.on_dispatch([0.0])
            started = time.time()
            try:
                single = self.get_batch_size(data) == 1
                if single and self.run_inline is not None and self.lone_s < INLINE_MAX_S:
                    (result,) = self.run_inline((data,))
                else:
                    (result,) = await self.callback((data,))
                took = time.time() - started
                if single:
                    self.lone_s = took
                self.optimizer.log_outbound(n=1, wait=0.0, duration=took)
                return True, result
            finally:
                self._busy.release()
                async with self._wake_event:
                    self._wake_event.notify_all()

        async def outbound_call(self, inputs_info: Any, training: bool = False) -> None:
            if self.on_dispatch is not None:
                now = time.time()
                self.on_dispatch([now - job.enqueue_time for job in inputs_info])
            try:
                await super().outbound_call(inputs_info, training)
            finally:
                async with self._wake_event:  # the runtime is free: dispatch what queued meanwhile
                    self._wake_event.notify_all()

    return MeasuredDispatcher


class Batcher:
    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_latency_ms: int,
        enabled: bool = True,
        pad_value: float | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._infer = infer
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.pad_value = pad_value
        self.metrics = metrics
        self._call: Callable[[np.ndarray], Awaitable[np.ndarray]] | None = None
        self._dispatcher: Any = None
        self._executor: ThreadPoolExecutor | None = None

    def _dispatch(self) -> Callable[[np.ndarray], Awaitable[np.ndarray]]:
        """Created on first use, so the dispatcher binds to the server's running event loop."""
        if self._call is None:
            cls = _dispatcher_class()
            dispatcher = cls(
                max_latency_in_ms=self.max_latency_ms,
                max_batch_size=self.max_batch_size,
                fallback=self._shed,
                get_batch_size=len,
                batch_dim=(0, 0),
            )
            if self.metrics is not None:
                dispatcher.on_dispatch = self.metrics.queue_waits
            dispatcher.run_inline = self._run_parts
            self._call = dispatcher(self._run_batch)
            self._dispatcher = dispatcher
        return self._call

    def fit_latency_model(self) -> tuple[float, float] | None:
        """Refit the batch-time model (seconds = a·samples + b) that load shedding uses to the batches
        measured so far (BentoML refits it by itself at most every 5 s); returns (a, b)."""
        if self._dispatcher is None:
            return None
        optimizer = self._dispatcher.optimizer
        optimizer.trigger_refresh()
        return float(optimizer.o_a), float(optimizer.o_b)

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Infer one request's samples (first axis), batched with whatever else is queued."""
        if not self.enabled:
            import anyio

            return await anyio.to_thread.run_sync(self._run_one, batch)
        call = self._dispatch()
        ran, result = await self._dispatcher.run_if_idle(batch)
        if not ran:
            result = await call(batch)
        return result  # type: ignore[no-any-return]

    def _shed(self) -> Any:
        raise ServingError(
            f"server overloaded: the batcher could not answer within max_latency_ms={self.max_latency_ms}",
            hint="retry later, add replicas, or raise batching.max_latency_ms",
        )

    def _run_one(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        out = self._infer(batch)
        if self.metrics is not None:
            self.metrics.batch(len(batch), time.perf_counter() - started)
            self.metrics.queue_waits([0.0])
        return out

    async def _run_batch(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        import asyncio

        # One batch runs at a time, so one dedicated thread serves; run_in_executor costs ~30 µs less
        # per hand-off than anyio's worker pool.
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optiserve-infer")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_parts, list(parts))

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
