"""The metrics contract: every metric a served variant exports, its labels and buckets, in one place.

The service creates its instruments from here (:class:`ServiceMetrics`), and everything that reads
them (the report's PromQL, the Helm chart's ServiceMonitor, PrometheusRule and Grafana dashboard) takes
the names and labels from here too, so a rename cannot silently break a dashboard.

Every series carries the variant's identity as labels: ``model``, ``variant`` (the content-derived
variant id), ``runtime`` and ``precision``. Latency buckets are dense between 1 and 100 ms, where CPU
inference of the models we serve lands, so server-side p50/p99 from ``histogram_quantile`` are
accurate to a few percent there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from optiserve.types import ServiceSpec

IDENTITY_LABELS: tuple[str, ...] = ("model", "variant", "runtime", "precision")

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.0025,
    0.003,
    0.004,
    0.005,
    0.006,
    0.007,
    0.008,
    0.009,
    0.010,
    0.0125,
    0.015,
    0.0175,
    0.020,
    0.025,
    0.030,
    0.035,
    0.040,
    0.050,
    0.060,
    0.070,
    0.080,
    0.090,
    0.100,
    0.125,
    0.150,
    0.200,
    0.300,
    0.500,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds. 1 ms steps up to 10 ms, then 2.5-10 ms steps to 100 ms, then coarse to 10 s."""

BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)

ERROR_KINDS: tuple[str, ...] = (
    "bad_request",  # 400: malformed JSON, missing fields
    "invalid_input",  # 422: shape, datatype, element count, NaN/Inf, undecodable image
    "payload_too_large",  # 413
    "unsupported_media_type",  # 415
    "not_found",  # 404: unknown model name
    "overloaded",  # 503: the batcher could not meet max_latency_ms
    "runtime",  # 500: the runtime failed on an input that passed validation
)

Kind = Literal["histogram", "counter", "gauge"]


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    help: str
    extra_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    across_workers: Literal["max", "livesum"] = "max"
    """A gauge of a server with several worker processes (``serving.replicas`` on one machine): the
    largest value of any of them, or the sum over those alive."""

    @property
    def labels(self) -> tuple[str, ...]:
        return IDENTITY_LABELS + self.extra_labels

    @property
    def series(self) -> str:
        """The stored name: histograms expose ``_bucket``/``_sum``/``_count``, counters ``_total``."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


REQUEST_DURATION = MetricDef(
    "optiserve_request_duration_seconds",
    "histogram",
    "Server-side request latency: body received to response ready (successful requests).",
    extra_labels=("protocol",),
    buckets=LATENCY_BUCKETS_S,
)
INFERENCE_DURATION = MetricDef(
    "optiserve_inference_duration_seconds",
    "histogram",
    "Runtime inference time of one batch (excludes queueing, decoding and encoding).",
    buckets=LATENCY_BUCKETS_S,
)
QUEUE_WAIT = MetricDef(
    "optiserve_queue_wait_seconds",
    "histogram",
    "Time a request waited in the adaptive batcher before its batch was dispatched.",
    buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = MetricDef(
    "optiserve_batch_size",
    "histogram",
    "Samples per runtime call formed by the adaptive batcher.",
    buckets=BATCH_SIZE_BUCKETS,
)
REQUESTS = MetricDef(
    "optiserve_requests",
    "counter",
    "Inference requests answered, by protocol and HTTP status code.",
    extra_labels=("protocol", "code"),
)
ERRORS = MetricDef(
    "optiserve_errors",
    "counter",
    "Failed inference requests by kind (see optiserve.metrics.ERROR_KINDS).",
    extra_labels=("kind",),
)
MODEL_LOAD = MetricDef(
    "optiserve_model_load_seconds",
    "gauge",
    "Seconds from process start of the service to ready: artifact check, runtime load and warm-up.",
)
READY = MetricDef(
    "optiserve_ready",
    "gauge",
    "Worker processes with the model loaded and warmed up (1 per server, or its replicas on one machine); "
    "0 while draining.",
    across_workers="livesum",
)
PROCESS_CPU = MetricDef(
    "optiserve_process_cpu_seconds", "counter", "CPU seconds used by the serving process (user + system)."
)
PROCESS_MEMORY = MetricDef(
    "optiserve_process_resident_memory_bytes",
    "gauge",
    "Resident memory of the serving processes (all its workers).",
    across_workers="livesum",
)

ALL: tuple[MetricDef, ...] = (
    REQUEST_DURATION,
    INFERENCE_DURATION,
    QUEUE_WAIT,
    BATCH_SIZE,
    REQUESTS,
    ERRORS,
    MODEL_LOAD,
    READY,
    PROCESS_CPU,
    PROCESS_MEMORY,
)


def identity(spec: ServiceSpec) -> dict[str, str]:
    """The identity label values of a served variant."""
    return {
        "model": spec.variant.model.name,
        "variant": spec.variant.id,
        "runtime": spec.runtime,
        "precision": spec.variant.precision,
    }


def selector(**labels: str) -> str:
    """A PromQL label selector, e.g. ``{variant="x",runtime="onnxruntime"}``."""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def quantile_query(metric: MetricDef, q: float, window: str = "1m", **labels: str) -> str:
    """PromQL for a histogram quantile over ``window``, aggregated across replicas of a variant."""
    if metric.kind != "histogram":
        raise ValueError(f"{metric.name} is a {metric.kind}, not a histogram")
    keep = ",".join(("le", *IDENTITY_LABELS))
    return (
        f"histogram_quantile({q}, sum by ({keep}) (rate({metric.name}_bucket{selector(**labels)}[{window}])))"
    )


def series_selector(names: Sequence[str], labels: Mapping[str, str]) -> str:
    """A PromQL selector of several series names with the same labels, e.g.
    ``{__name__=~"a|b",variant="x"}`` (names are matched exactly: they contain no regex syntax)."""
    matchers = [f'__name__=~"{"|".join(names)}"', *(f'{k}="{v}"' for k, v in sorted(labels.items()))]
    return "{" + ",".join(matchers) + "}"


def counter_series(metric: MetricDef) -> tuple[str, ...]:
    """The cumulative sample names of a metric: ``_total`` of a counter; ``_bucket``, ``_sum`` and
    ``_count`` of a histogram (what a window's growth is computed from); none for a gauge."""
    if metric.kind == "histogram":
        return (f"{metric.name}_bucket", f"{metric.name}_sum", f"{metric.name}_count")
    return (metric.series,) if metric.kind == "counter" else ()


def forget_dead_workers() -> None:
    """Drop the ``livesum`` gauge files of worker processes that no longer exist. BentoML removes a
    worker's own when it exits cleanly, but not after a crash or SIGKILL, and a restarted worker would
    otherwise be counted twice in ``optiserve_ready``."""
    import glob
    import os
    import re

    import psutil
    from prometheus_client import multiprocess

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
        found = re.search(r"_(\d+)\.db$", path)
        if found and not psutil.pid_exists(int(found.group(1))):
            multiprocess.mark_process_dead(int(found.group(1)), folder)  # type: ignore[no-untyped-call]


class ServiceMetrics:
    """The instruments of one served variant, created through ``bentoml.metrics`` so that BentoML's
    ``/metrics`` endpoint exports them (in its multiprocess registry), with the identity labels bound."""

    def __init__(self, spec: ServiceSpec) -> None:
        import bentoml

        forget_dead_workers()
        self.identity = identity(spec)
        made: dict[str, Any] = {}
        for m in ALL:
            factory = {
                "histogram": bentoml.metrics.Histogram,
                "counter": bentoml.metrics.Counter,
                "gauge": bentoml.metrics.Gauge,
            }[m.kind]
            kwargs: dict[str, Any] = {"name": m.name, "documentation": m.help, "labelnames": list(m.labels)}
            if m.buckets:
                kwargs["buckets"] = list(m.buckets)
            if m.kind == "gauge":
                kwargs["multiprocess_mode"] = m.across_workers
            made[m.name] = factory(**kwargs)
        self._made = made
        self._children: dict[tuple[Any, ...], Any] = {}
        for kind in ERROR_KINDS:  # zero series exist from the start, so rate() and alerts see them
            self._child(ERRORS, kind=kind).inc(0)

    def _child(self, metric: MetricDef, **extra: str) -> Any:
        """The labelled series, looked up once (``labels()`` builds and checks a label tuple per call:
        a few microseconds, five times a request)."""
        key = (metric.name, *extra.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._made[metric.name].labels(**self.identity, **extra)
        return child

    def request(self, protocol: str, code: int, seconds: float | None) -> None:
        self._child(REQUESTS, protocol=protocol, code=str(code)).inc()
        if seconds is not None:
            self._child(REQUEST_DURATION, protocol=protocol).observe(seconds)

    def error(self, kind: str) -> None:
        self._child(ERRORS, kind=kind).inc()

    def batch(self, size: int, inference_s: float) -> None:
        self._child(BATCH_SIZE).observe(size)
        self._child(INFERENCE_DURATION).observe(inference_s)

    def queue_waits(self, waits_s: list[float]) -> None:
        queue = self._child(QUEUE_WAIT)
        for w in waits_s:
            queue.observe(w)

    def loaded(self, seconds: float) -> None:
        self._child(MODEL_LOAD).set(seconds)

    def ready(self, value: bool) -> None:
        self._child(READY).set(1.0 if value else 0.0)

    def process(self, cpu_seconds_delta: float, rss_bytes: int) -> None:
        """BentoML's multiprocess registry has no process collector: the service reports its own."""
        self._child(PROCESS_CPU).inc(max(0.0, cpu_seconds_delta))
        self._child(PROCESS_MEMORY).set(rss_bytes)
