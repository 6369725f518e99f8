"""What every endpoint of the service shares: the runtime, the batcher, validation, pre/post-processing,
metrics and readiness. The BentoML service class and the Open Inference Protocol routes are thin
layers over one :class:`ServingCore`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiserve.errors import (
    InputValidationError,
    InvalidInput,
    NotFound,
    OptiserveError,
    PayloadTooLarge,
    ServingError,
    UnsupportedMediaType,
)
from optiserve.manifest import load_variant
from optiserve.metrics import ServiceMetrics
from optiserve.safeload import check_artifacts, check_model_files

from .batcher import Batcher
from .runtimes.base import Runtime
from .triton import Statistics
from .validation import check_tensor

if TYPE_CHECKING:
    import numpy as np
    from starlette.requests import Request
    from starlette.responses import Response

    from optiserve.models.base import BuiltinModel
    from optiserve.types import ServiceSpec

LOG = logging.getLogger("optiserve.service")
WARMUP_SEQUENTIAL = 12
"""Single requests through the batcher at start-up (the first runs of a runtime are slow), then a burst
that runs as larger batches: the batcher fits its batch-time model, which load shedding uses, to both
before clients arrive."""
WARMUP_BURST = 8
NOT_READY_RETRY_S = 1
"""``Retry-After`` of a 503 while the model loads or warms up (or the server drains): readiness is
seconds away, and a load balancer's readiness probe, not this header, decides when traffic returns."""


def error_kind(e: BaseException) -> str:
    for cls, kind in (
        (NotFound, "not_found"),
        (PayloadTooLarge, "payload_too_large"),
        (UnsupportedMediaType, "unsupported_media_type"),
        (InvalidInput, "invalid_input"),
        (InputValidationError, "bad_request"),
        (ServingError, "overloaded"),
    ):
        if isinstance(e, cls):
            return kind
    return "runtime"


class ServingCore:
    def __init__(self, spec: ServiceSpec) -> None:
        directory, max_gib = Path(spec.variant_dir), spec.limits.max_model_gib
        # Paths out of the folder and files too large, by size alone, before anything is hashed...
        check_artifacts(load_variant(directory, verify=False), directory, max_gib)
        variant = load_variant(directory)  # re-checks every artifact's sha256
        # ...then an ONNX model's external data, before any runtime (or process-wide metric) exists.
        check_model_files(variant, directory, max_gib)
        self.spec = spec
        self.model = spec.variant.model
        self.input = self.model.inputs[0]
        self.output_name = self.model.outputs[0].name if self.model.outputs else "output"
        self.builtin = _builtin(spec)
        self.metrics = ServiceMetrics(spec)
        self.metrics.ready(False)
        self.stats = Statistics()
        runtime_cls = Runtime.get(spec.runtime)
        runtime_cls.require_available()
        self.runtime = runtime_cls(variant, directory, spec.threads, spec.runtime_options)
        self.runtime.load()
        self.batcher = Batcher(
            self.runtime.infer_any,
            max_batch_size=spec.batching.max_batch_size,
            max_latency_ms=spec.batching.max_latency_ms,
            enabled=spec.batching.enabled,
            pad_value=self.builtin.pad_value if self.builtin else None,
            metrics=_Both(self.metrics, self.stats),
        )
        self.ready = False
        self.in_flight = 0
        """Requests being read, validated, run or answered (see Batcher.__call__'s ``alone``)."""
        # The names baked into the variant (never the serving machine's dataset packages).
        self.labels = list(self.model.labels) if self.model.labels else None

    @property
    def names(self) -> tuple[str, ...]:
        """Names this service answers to on the Open Inference Protocol: the model's and the variant id."""
        return (self.model.name, self.spec.variant.id)

    @property
    def raw_input(self) -> str | None:
        return self.builtin.raw_input if self.builtin else None

    async def warm_up(self) -> None:
        """Ready only after real inferences ran through the batcher (and its latency model is trained)."""
        import numpy as np

        sample = np.zeros((1, *self.input.sample_shape), dtype=self.input.dtype)
        # A model slower than max_latency_ms allows for the burst would otherwise shed its own warm-up
        # requests and never start (efficientnet-lite0 on torch-eager with max_latency_ms 100).
        self.batcher.shedding = False
        try:
            for _ in range(WARMUP_SEQUENTIAL):
                await self.batcher(sample)
            if self.batcher.enabled:
                await self.batcher.calibrate(sample)
            await asyncio.gather(*(self.batcher(sample) for _ in range(WARMUP_BURST)))
        finally:
            self.batcher.shedding = True
        self.batcher.fit_latency_model()
        seconds = _since_process_start()
        self.metrics.loaded(seconds)
        self.ready = True
        self.metrics.ready(True)
        LOG.info(
            "%s on %s ready in %.1f s (preferred batch size %d of at most %d)",
            self.spec.variant.id,
            self.spec.runtime,
            seconds,
            self.batcher.preferred_batch_size,
            self.batcher.max_batch_size,
        )

    async def sample_process(self, every_s: float = 1.0) -> None:
        """Report this process's CPU and memory to the metrics contract until cancelled."""
        import psutil

        me = psutil.Process()
        last = 0.0
        while True:
            times = me.cpu_times()
            total = times.user + times.system
            self.metrics.process(total - last, me.memory_info().rss)
            last = total
            await asyncio.sleep(every_s)

    def stop(self) -> None:
        self.ready = False
        self.metrics.ready(False)

    def check(self, array: np.ndarray) -> np.ndarray:
        bounds = self.builtin.input_bounds if self.builtin else None
        return check_tensor(self.input, array, self.spec.limits, bounds)

    def from_raw(self, items: list[bytes]) -> np.ndarray:
        """Images or texts → the model's input, through the built-in model's own preprocessing."""
        if self.builtin is None or self.builtin.raw_input is None:
            raise UnsupportedMediaType(
                f"{self.model.name} takes {self.input.dtype} tensors of shape {self.input.describe()}, "
                "not raw bytes (send a tensor)"
            )
        if not items:
            raise InvalidInput(f"no {self.builtin.raw_input} in the request")
        limit = self.spec.limits.max_request_batch
        if len(items) > limit:
            raise PayloadTooLarge(f"{len(items)} items in one request; at most {limit}")
        return self.check(self.builtin.from_raw(items))

    async def infer(self, array: np.ndarray) -> np.ndarray:
        if not self.ready:
            raise ServingError(
                "the model is not ready yet (loading or warming up)",
                hint="retry shortly",
                retry_after_s=NOT_READY_RETRY_S,
            )
        alone = self.in_flight == 1
        if alone and self.batcher.may_hide_company(array):
            # Right after an inline run blocked the loop, requests read meanwhile have not counted
            # themselves in yet: let them start, then look again. Without this, under overload every
            # request ran inline, one after another, while the rest waited unseen in front of the
            # batcher: no batching, no shedding, 47 s of latency at 3x capacity on one core.
            await asyncio.sleep(0)
            alone = self.in_flight == 1
        return await self.batcher(array, alone=alone)

    def top_k(self, logits: np.ndarray, k: int) -> list[list[tuple[float, int, str]]]:
        """Per sample, the k best classes as (probability, index, label)."""
        import numpy as np

        if logits.ndim != 2:
            raise InvalidInput(f"classification needs a 2-d output (samples × classes), not {logits.shape}")
        k = min(k, logits.shape[1])
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1)[:, :k]
        labels = self.labels or [str(i) for i in range(logits.shape[1])]
        return [[(float(p[i]), int(i), labels[i]) for i in row] for p, row in zip(probs, order, strict=True)]

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it exceeds the limit (before it is all read)."""
        limit = int(self.spec.limits.max_body_mib * 1024 * 1024)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {int(declared):,} bytes; at most {limit:,} accepted")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over {limit:,} bytes; at most {limit:,} accepted")
            chunks.append(chunk)
        return b"".join(chunks)

    async def answer(
        self, protocol: str, handler: Callable[[], Awaitable[Response]], *, inference: bool = True
    ) -> Response:
        """Run a handler; count it (in the statistics too when it is an inference); turn every error
        into a JSON ``{"error": ...}`` with its status."""
        self.in_flight += 1
        try:
            return await self._answer(protocol, handler, inference)
        finally:
            self.in_flight -= 1

    async def _answer(
        self, protocol: str, handler: Callable[[], Awaitable[Response]], inference: bool
    ) -> Response:
        from starlette.responses import JSONResponse

        started = time.perf_counter()
        try:
            response = await handler()
        except OptiserveError as e:
            status = e.http_status
            self.metrics.error(error_kind(e))
            self.metrics.request(protocol, status, None)
            if inference:
                self.stats.request(False, time.perf_counter() - started)
            if status >= 500 and not isinstance(e, ServingError):
                LOG.exception("request failed")
            return JSONResponse({"error": e.one_line()}, status_code=status, headers=retry_headers(e))
        except Exception as e:
            LOG.exception("inference failed")
            self.metrics.error("runtime")
            self.metrics.request(protocol, 500, None)
            if inference:
                self.stats.request(False, time.perf_counter() - started)
            lines = str(e).strip().splitlines()
            first = (lines[0] if lines else type(e).__name__)[:200]
            return JSONResponse(
                {"error": f"inference failed on {self.spec.runtime}: {first}"},
                status_code=500,
            )
        took = time.perf_counter() - started
        self.metrics.request(protocol, response.status_code, took)
        if inference:
            self.stats.request(True, took)
        return response


def retry_headers(e: OptiserveError | None = None) -> dict[str, str] | None:
    """``Retry-After`` for a 503 (a shed request, or one that came before the model was ready): when
    the batcher expects to have room again, else :data:`NOT_READY_RETRY_S`. None for other errors."""
    if e is None:
        return {"Retry-After": str(NOT_READY_RETRY_S)}
    if not isinstance(e, ServingError):
        return None
    return {"Retry-After": str(e.retry_after_s or NOT_READY_RETRY_S)}


class _Both:
    """What the batcher measures goes to the Prometheus contract and to Triton-style statistics."""

    def __init__(self, metrics: ServiceMetrics, stats: Statistics) -> None:
        self._sinks = (metrics, stats)

    def batch(self, size: int, inference_s: float) -> None:
        for sink in self._sinks:
            sink.batch(size, inference_s)

    def queue_waits(self, waits_s: list[float]) -> None:
        for sink in self._sinks:
            sink.queue_waits(waits_s)


def _since_process_start() -> float:
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def _builtin(spec: ServiceSpec) -> type[BuiltinModel] | None:
    if spec.variant.model.source != "builtin":
        return None
    from optiserve.models.base import BuiltinModel

    cls: Any = BuiltinModel.registry().get(spec.variant.model.ref)
    return cls  # type: ignore[no-any-return]
