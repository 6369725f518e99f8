"""The spine: one frozen, typed object per stage, each carrying its full lineage.

    ModelSpec ──optimize──▶ Variant* ──package──▶ ServiceSpec ──deploy──▶ Endpoint ──bench──▶ BenchResult*
                                                                                    ──report──▶ Report

A variant's id is derived from its content (see :mod:`optiserve.ids`) and is used unchanged as the
Bento tag, Helm release suffix, Prometheus ``variant`` label and result file name.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["float32", "float16", "int64", "int32", "uint8"]
ArtifactFormat = Literal["torch", "onnx", "openvino", "tensorrt", "external"]
"""``external``: a model served by a server we did not start (``bench --url``); no artifact here."""
Precision = Literal["fp32", "fp16", "int8"]
ModelSource = Literal["builtin", "onnx", "torch-callable", "remote"]
Task = Literal["image-classification", "text-embedding", "generic"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(Frozen):
    """One model input or output. ``None`` in the shape marks a dynamic axis.

    Axis 0 is the batch axis. Other dynamic axes (a text model's sequence length) need ``example``:
    a concrete per-sample shape used wherever one is needed (warm-up, export, synthetic data).
    """

    name: str
    dtype: DType = "float32"
    shape: tuple[int | None, ...]
    example: tuple[int, ...] | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """A concrete shape of one sample: ``example``, or the fixed axes after the batch axis."""
        if self.example is not None:
            return self.example
        return tuple(int(d) for d in self.shape[1:] if d is not None)

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        """Dynamic axes besides the batch axis."""
        return tuple(i for i, d in enumerate(self.shape) if i > 0 and d is None)

    def matches(self, sample_shape: tuple[int, ...]) -> bool:
        """Whether one sample of this shape fits (dynamic axes take any length >= 1)."""
        axes = self.shape[1:]
        return len(sample_shape) == len(axes) and all(
            (d is None and s >= 1) or d == s for d, s in zip(axes, sample_shape, strict=True)
        )

    def describe(self) -> str:
        """The expected shape as users read it: ``(n, 3, 224, 224)``, ``(n, ?)`` for a dynamic axis."""
        return "(" + ", ".join(["n", *("?" if d is None else str(d) for d in self.shape[1:])]) + ")"

    @property
    def fixed_batch(self) -> int | None:
        """The batch size a model was exported with when its batch axis is not dynamic, else None."""
        return self.shape[0] if self.shape and self.shape[0] is not None else None


class ModelSpec(Frozen):
    """What the user asked for: a built-in model, an ONNX file, or a ``module:callable`` torch model."""

    name: str
    source: ModelSource
    ref: str = Field(description="built-in name, ONNX path, or module:callable")
    task: Task = "generic"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()
    sha256: str | None = Field(default=None, description="of the source file, when there is one")
    labels: tuple[str, ...] | None = None
    """Class names of a classifier's outputs, baked in when the model is resolved, so a server reports
    the names the model was trained with, not those of whatever dataset package it finds."""


class Artifact(Frozen):
    path: str = Field(description="relative to the variant directory")
    sha256: str
    size_bytes: int


class OptimizerStep(Frozen):
    optimizer: str
    tag: str = Field(description="the readable part this step adds to the variant id, e.g. 'onnx'")
    config: dict[str, Any] = Field(default_factory=dict)


class Variant(Frozen):
    """One servable form of a model, with every step that produced it."""

    id: str
    model: ModelSpec
    parent_id: str | None = None
    steps: tuple[OptimizerStep, ...] = ()
    format: ArtifactFormat
    precision: Precision = "fp32"
    artifacts: dict[str, Artifact]
    parameters: int | None = None
    created_at: _dt.datetime
    cpu_features: tuple[str, ...] | None = None
    """INT8 variants: the x86 features of the CPU they were calibrated and tuned on that decide how INT8
    runs (``avx2``, ``avx512_vnni``, ``avx_vnni``, ``amx_int8``); the chart pins them to nodes that
    have them. None for float variants."""

    @property
    def size_bytes(self) -> int:
        return sum(a.size_bytes for a in self.artifacts.values())

    @property
    def chain(self) -> str:
        return " → ".join([self.model.source, *(s.optimizer for s in self.steps)])


class MicroBench(Frozen):
    """In-process latency of one runtime on one variant: warm-up excluded, no HTTP, no batcher."""

    threads: int
    batch1_n: int
    batch1_p50_ms: float
    batch1_p99_ms: float
    batch: int
    batch_throughput: float = Field(description="samples per second at `batch`")


Metric = Literal["top1_accuracy", "top1_agreement", "sts_spearman", "cosine_similarity", "max_abs_diff"]
"""``sts_spearman``: Spearman correlation of the embeddings' cosine similarity with the gold scores of
labelled text pairs (an STS set); the task metric of an embedding model."""


class Interval(Frozen):
    """A 95% confidence interval (bootstrap over the measured requests)."""

    low: float
    high: float


class Evaluation(Frozen):
    """How good a variant is, in process, on held-out inputs, and whether it passes the accuracy gate.

    ``metric``/``value`` is the gated figure: the task metric where labels exist (top-1 accuracy),
    else agreement with the FP32 reference (top-1 agreement for classifiers, cosine similarity for
    embeddings); ``reference_value`` is the same metric for the FP32 reference on the same inputs.
    ``max_abs_diff`` is informative only (it is not gated).
    """

    variant_id: str
    runtime: str
    reference_variant_id: str
    metric: Metric
    value: float
    reference_value: float
    n_samples: int
    max_abs_diff: float
    agreement: float | None = Field(default=None, description="top-1 agreement with the reference")
    gate: float | None = Field(default=None, description="minimum value / reference_value; None: not gated")
    passed: bool = True
    latency: MicroBench | None = None
    data: str | None = None
    """Where the evaluation samples came from, and how many."""
    value_ci: Interval | None = None
    """95% interval of ``value`` (bootstrap over samples)."""
    ratio_ci: Interval | None = None
    """95% interval of ``value / reference_value`` (paired bootstrap over the same samples)."""
    top5: float | None = None
    reference_top5: float | None = None
    agreement_decided: float | None = None
    """Top-1 agreement on the samples where FP32's top-2 probabilities differ by at least 0.05."""
    n_decided: int | None = None
    agreement_ties: float | None = None
    """Top-1 agreement on the near ties (FP32's top-2 probabilities within 0.05)."""
    n_ties: int | None = None
    stress_agreement: float | None = None
    """Top-1 agreement on the model's unlabelled stress set, where it has one."""
    stress_n: int | None = None

    @property
    def ratio(self) -> float | None:
        return self.value / self.reference_value if self.reference_value else None

    @property
    def delta(self) -> float:
        return self.value - self.reference_value


class BatchingSpec(Frozen):
    """BentoML adaptive batching: the batcher never waits longer than max_latency_ms for a batch."""

    enabled: bool = True
    max_batch_size: int = Field(default=8, ge=2, le=1024)
    max_latency_ms: int = Field(default=10_000, ge=1)


class ThreadSpec(Frozen):
    """Runtime threads, identical for every runtime so an A/B pair gets the same resources."""

    intra_op: int = Field(default=1, ge=1)
    inter_op: int = Field(default=1, ge=1)
    streams: int = Field(default=1, ge=1)
    """Parallel inference streams (OpenVINO NUM_STREAMS); the other runtimes run one batch at a time."""
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    """OpenVINO's performance hint; the explicit threads and streams above take precedence."""


class ServingLimits(Frozen):
    """What the service accepts before anything reaches a runtime (client mistakes become 4xx)."""

    max_body_mib: float = Field(default=32.0, gt=0)
    """Request bodies above this are refused with 413 before they are read in full."""
    max_request_batch: int = Field(default=64, ge=1)
    """Samples one request may carry; more is refused with 413 (split the request)."""
    non_finite: Literal["reject", "allow"] = "reject"
    """NaN/Inf in a float input: ``reject`` (422) or ``allow`` (passed to the runtime as they are)."""
    max_model_gib: float = Field(default=4.0, gt=0)
    """A variant whose model files (its artifacts, and an ONNX model's external data) are larger in all is
    refused before any runtime reads them: a runtime holds at least that much in memory."""


class ServiceSpec(Frozen):
    variant: Variant
    variant_dir: str
    runtime: str
    batching: BatchingSpec = BatchingSpec()
    threads: ThreadSpec = ThreadSpec()
    limits: ServingLimits = ServingLimits()
    access_log: bool = False
    """One log line per request (BentoML's access log); off by default, it costs ~0.05 ms a request."""
    tracing: bool = False
    """OpenTelemetry spans for inference requests (BentoML's tracing config decides where they go)."""
    runtime_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Runtime-specific settings, e.g. ``{"compile": true}`` for torch, ``{"device": "GPU"}`` for OpenVINO."""
    host: str = "127.0.0.1"
    port: int | None = None
    replicas: int = Field(default=1, ge=1)
    """Copies of the model serving this pair (``serving.replicas``). On one machine (the local and
    docker targets) they are worker processes of one server behind its one port, each pinned to its own
    share of the server's CPUs when there are at least as many CPUs (else they share them); on
    Kubernetes they are pods, each running one."""


class Endpoint(Frozen):
    service: ServiceSpec
    url: str
    target: Literal["local", "docker", "kubernetes", "url"] = "local"

    @property
    def predict_url(self) -> str:
        return f"{self.url}/predict"

    @property
    def infer_url(self) -> str:
        """The Open Inference Protocol v2 infer endpoint of the served model."""
        return f"{self.url}/v2/models/{self.service.variant.model.name}/infer"


class LoadSpec(Frozen):
    """One load level of a scenario, always labelled with its load model."""

    scenario: str
    load_model: Literal["closed", "open"]
    users: int = Field(ge=1)
    """Closed loop: concurrent users. Open loop: the most requests in flight (connections)."""
    duration_s: float = Field(gt=0)
    warmup_s: float = Field(ge=0)
    rate_rps: float | None = Field(default=None, gt=0)
    """Open loop: the offered rate (the peak, for a profile)."""
    arrival: Literal["constant", "poisson"] = "constant"
    """Open loop: evenly spaced sends, or exponential gaps (a Poisson process) at the same mean rate."""
    profile: tuple[tuple[float, float], ...] = ()
    """Open loop, optional: (seconds, rate) segments after the warm-up (ramp, spike); else ``rate_rps``."""
    encoding: Literal["binary", "json"] = "binary"
    """How requests carry tensors: the binary tensor extension, or the protocol's plain JSON."""


class MachineInfo(Frozen):
    hostname: str
    cpu_model: str
    logical_cpus: int
    memory_gib: float
    platform: str
    python: str


class LatencyStats(Frozen):
    """Milliseconds, over the measured window only; n is the sample count behind every figure."""

    n: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float


class ErrorWindow(Frozen):
    """A stretch of failed requests in a load level (a worker killed, a restart, shedding), in seconds
    from the start of the level's measured window."""

    start_s: float
    end_s: float = Field(description="when the last failed request of the stretch was answered")
    n_errors: int
    recovered_after_s: float | None = Field(
        description="from the first failure to the first successful answer after the last; None: never"
    )


class Integrity(Frozen):
    """Whether a load level's figures can be trusted, and why not when they cannot."""

    stable: bool | None = None
    """Three consecutive windows within 10% on throughput and p99; None when the level was too short."""
    windows: int = 0
    target_rps: float | None = None
    """Open loop: the offered rate."""
    late_fraction: float | None = None
    """Open loop: requests sent more than 1 ms after their scheduled time."""
    generator_cpu_max: float | None = None
    """Peak CPU of the load generator process (percent of one core)."""
    generator_capacity_rps: float | None = None
    """What this generator achieves against a null endpoint on this machine (measured at start)."""
    error_windows: tuple[ErrorWindow, ...] = ()
    """Stretches of failed requests, and how long the service took to answer again after each."""
    flags: tuple[str, ...] = ()
    """Human-readable reasons to distrust this level (unstable, generator saturated, rate not reached)."""


class ServerSideStats(Frozen):
    """What the server measured (its Prometheus histograms), over the same window as the client."""

    source: Literal["prometheus", "scrape"]
    """``prometheus``: PromQL against a real Prometheus; ``scrape``: /metrics read directly."""
    requests: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_batch_size: float | None = None
    queue_wait_p50_ms: float | None = None
    cpu_percent: float | None = None
    memory_mib: float | None = None


class BenchResult(Frozen):
    variant_id: str
    runtime: str
    precision: Precision
    endpoint: Endpoint
    load: LoadSpec
    machine: MachineInfo
    started_at: _dt.datetime
    measured_s: float
    n_requests: int
    n_errors: int
    error_rate: float
    throughput_rps: float
    latency_ms: LatencyStats | None
    errors_by_kind: dict[str, int] = Field(default_factory=dict)
    samples_path: str
    ci_p50_ms: Interval | None = None
    ci_p99_ms: Interval | None = None
    ci_throughput_rps: Interval | None = None
    integrity: Integrity = Integrity()
    server: ServerSideStats | None = None


CostBasis = Literal["max-throughput-at-slo", "offered-load"]


class CostEstimate(Frozen):
    """What a million inferences cost on one instance type, from measured throughput (see optiserve.cost).

    ``max-throughput-at-slo``: the replicas measured (one unless ``serving.replicas`` said more) run at
    the highest throughput whose p99 met ``slo_ms`` with no errors. ``offered-load``: enough replicas
    (each at that throughput per replica) to serve ``offered_rps``, paid for whether or not they are busy.
    """

    instance: str
    price_per_hour: float
    replicas: int = Field(ge=1)
    basis: CostBasis
    throughput_rps: float = Field(description="per replica: the highest throughput that met the SLO")
    slo_ms: float
    offered_rps: float | None = None
    usd_per_million: float


class ReportRow(Frozen):
    variant_id: str
    runtime: str
    precision: Precision
    size_bytes: int
    accuracy: Evaluation | None
    results: tuple[BenchResult, ...]
    costs: tuple[CostEstimate, ...] = ()


class Report(Frozen):
    created_at: _dt.datetime
    model: str
    rows: tuple[ReportRow, ...]
    skipped: dict[str, str] = Field(default_factory=dict, description="what was not run, and why")
