"""The experiment file (YAML) that drives ``optiserve run``; every key is checked, flags override it.

A misspelt key or a wrong type is refused with one line that names the key, what was given and what
is allowed, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from optiserve.errors import ConfigError
from optiserve.types import BatchingSpec, DType, ServingLimits, ThreadSpec
from optiserve.userdata import Preprocess


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(Strict):
    ref: str = "efficientnet-lite0"
    """A built-in name, a path to an .onnx file, or module:callable returning a torch nn.Module."""
    name: str | None = None
    """Display name (defaults to the built-in name, the file stem or the callable's name)."""
    input_shape: tuple[int, ...] | None = None
    """Per-sample input shape without the batch axis; required for module:callable models."""
    input_dtype: DType = "float32"
    input_name: str = "input"
    preprocess: Preprocess | None = None
    """How images become an ONNX image model's input, for eval.data / calibration.data image sets:
    ``{resize, crop, mean, std, layout, color}`` (see optiserve.userdata.Preprocess)."""


class OptimizerEntry(Strict):
    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class ServingConfig(Strict):
    runtimes: tuple[str, ...] | None = None
    """Runtimes to serve with; default: every available runtime that accepts each variant's format."""
    variants: tuple[str, ...] | None = Field(default=None, min_length=1)
    """Variant ids that `serve`, `bench`, `build` and `deploy` take when ``--variant`` is not given
    (`tune`'s recommendation names one); default: every variant of the model in the workdir."""
    target: str = "local"
    """Where variants are served: ``local`` (processes), ``docker`` (their images, run as the chart's
    pods) or ``kubernetes``; see optiserve.deploy.targets. ``url``: a running server (``serving.url``)."""
    url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    """An Open Inference Protocol server to load-test instead of serving variants (``bench --url``)."""
    batching: BatchingSpec = BatchingSpec()
    threads: ThreadSpec = ThreadSpec()
    ready_timeout_s: float = Field(default=300.0, gt=0)
    serve_rejected: bool = False
    """Also serve variants that failed the accuracy gate (they are never served silently)."""
    cpus: tuple[int, ...] | None = None
    """CPUs each server is pinned to (default: see ``cpu_split``); disjoint from the generator's."""
    replicas: int = Field(default=1, ge=1)
    """Copies of each served model: worker processes of one server on this machine (local, docker),
    each on its own share of ``serving.cpus`` (see ``replica_cpus``); pods on Kubernetes. Measured
    throughput is theirs together, and cost is priced per replica."""
    limits: ServingLimits = ServingLimits()
    runtime_options: dict[str, dict[str, str | int | float | bool]] = Field(default_factory=dict)
    """Per runtime name, e.g. ``{"torch-eager": {"compile": true}, "openvino": {"device": "GPU"}}``."""
    access_log: bool = False
    tracing: bool = False


class LoadConfig(Strict):
    scenario: str = "closed-loop"
    concurrency: tuple[PositiveInt, ...] = Field(default=(1, 4), min_length=1)
    duration_s: float = Field(default=12.0, gt=0)
    warmup_s: float = Field(default=3.0, ge=0)
    payload_samples: int = Field(default=8, ge=1, le=256)
    """Distinct eval samples sent round-robin by the load generator."""
    prometheus_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    """Server-side figures from this Prometheus (e.g. http://prometheus.monitoring:9090: the Kubernetes
    path), which must already scrape the services. None: optiserve starts ``prometheus`` for the run when
    it is on PATH, else reads each service's /metrics directly."""
    rates: tuple[PositiveFloat, ...] = (10.0, 40.0)
    """Open loop: offered requests per second, one level each."""
    arrival: Literal["constant", "poisson"] = "poisson"
    """Open loop: evenly spaced sends, or a Poisson process at the same mean rate."""
    slo_ms: float = Field(default=100.0, gt=0)
    """The p99 bound for the SLO search and for cost at the maximum throughput that meets it."""
    encoding: Literal["binary", "json"] = "binary"
    """How load-test requests carry tensors: the binary tensor extension, or the protocol's plain JSON."""
    scenario_options: dict[str, Any] = Field(default_factory=dict)
    """Further settings of the chosen scenario (e.g. slo-search: max_rate, steps; spike: spike_rate)."""
    locust_processes: int = Field(default=1, ge=1, le=64)
    """Closed loop: Locust worker processes (``--processes``; a master and N workers) for more load
    than one Python process can generate."""
    generator_cpus: tuple[int, ...] | None = None
    """CPUs the load generator is pinned to (default: see ``cpu_split``)."""


class EvalConfig(Strict):
    samples: int = Field(default=1000, ge=1, le=100_000)
    """Held-out samples for the accuracy check (disjoint from the calibration samples), at most; a
    built-in's labelled set may hold fewer (efficientnet-lite0: 924 crops). Enough that the 95% interval
    of an INT8 variant's accuracy ratio to FP32 is about ±2 points."""
    data: Path | None = None
    """Your own evaluation set: an image folder (one sub-folder per class), a .csv/.jsonl of path,label
    or text,label rows, or an .npz with x (and y). With labels the gate uses top-1 accuracy."""
    labels: Path | None = None
    """Class names, one per line, index 0 first: maps an image folder's sub-folders (default: their
    sorted order) and the class names of .csv/.jsonl labels to class indices."""
    stress_samples: int = Field(default=64, ge=0, le=100_000)
    """Samples of a built-in's unlabelled stress set, where only agreement with FP32 is measured."""
    gate: float = Field(default=0.99, gt=0, le=1)
    """A variant passes when its metric >= gate × the FP32 reference's (MLPerf uses 0.99)."""
    threads: int | None = Field(default=None, ge=1)
    """Threads for evaluation and the in-process microbenchmark (default: every CPU)."""
    microbench: bool = True
    """Measure in-process p50/p99 at batch 1 and throughput at `batch`."""
    batch: int = Field(default=32, ge=2, le=4096)
    budget_s: float = Field(default=2.0, gt=0)
    """Seconds per microbenchmark measurement (batch 1, then `batch`)."""


class CalibrationConfig(Strict):
    samples: int = Field(default=300, ge=1, le=100_000)
    data: Path | None = None
    """Your own calibration set, in the forms eval.data takes (labels are not needed); must share no
    sample with eval.data."""
    path: Path | None = None
    """An .npy file of preprocessed samples, instead of the model's own calibration split."""


class CostConfig(Strict):
    instance: str | None = None
    """Instance type to price (default: the CPU-only one with as many vCPUs as the benchmark machine)."""
    offered_rps: float | None = Field(default=None, gt=0)
    """Also price serving this many requests/s (replicas = ceil(offered ÷ max throughput at the SLO))."""
    prices: Path | None = None
    """A YAML price table that replaces or adds instance types (see optiserve/data/prices.yaml)."""


class KubernetesConfig(Strict):
    """Settings of the ``kubernetes`` target (``serving.target: kubernetes``)."""

    namespace: str = "default"
    image_repository: str = ""
    """Registry prefix the cluster pulls the images from: ``<repository>/<variant id>:<runtime>``."""
    release_prefix: str = "optiserve"


class TuneSpace(Strict):
    """What `optiserve tune` searches: every combination of these is one candidate configuration."""

    variants: tuple[str, ...] | None = Field(default=None, min_length=1)
    """Variant ids (default: every variant in the workdir that passed its accuracy gate)."""
    runtimes: tuple[str, ...] | None = Field(default=None, min_length=1)
    """Runtimes (default: ``serving.runtimes``, else every available runtime that serves the variant)."""
    max_batch_size: tuple[int, ...] = Field(default=(2, 4, 8, 16), min_length=1)
    max_latency_ms: tuple[int, ...] = Field(default=(100, 1000), min_length=1)
    """The batching deadline: how long a request may wait in the queue before it is shed (HTTP 503)."""
    intra_op_threads: tuple[int, ...] = Field(default=(1,), min_length=1)
    streams: tuple[int, ...] = Field(default=(1,), min_length=1)
    """OpenVINO inference streams (other runtimes run one batch at a time and ignore this)."""
    replicas: tuple[int, ...] = Field(default=(1,), min_length=1)
    """Replicas serving a candidate together (``serving.replicas``): worker processes of one server here,
    each on its own share of the server CPUs where there are as many CPUs (else they share them); pods
    on Kubernetes. Cost is priced per replica, so more replicas win only where they serve more per
    replica (or the target rate needs them)."""


class TuneConfig(Strict):
    """`optiserve tune`: the cheapest configuration whose p99 meets ``load.slo_ms`` (at ``cost.offered_rps``
    when set, else at its highest such rate) with accuracy at or above ``eval.gate`` × FP32."""

    strategy: Literal["grid", "random", "bayesian"] = "bayesian"
    trials: int | None = Field(default=None, ge=1)
    """Trials to run (default: the grid's size for ``grid``, a third of it, at least 4, otherwise)."""
    seed: int = 0
    space: TuneSpace = TuneSpace()
    min_rate: float = Field(default=5.0, gt=0)
    max_rate: float = Field(default=2000.0, gt=0)
    steps: int = Field(default=4, ge=1, le=12)
    """Rate-search levels after the first (each halves the bracket once the rate failed)."""
    duration_s: float = Field(default=4.0, gt=0)
    warmup_s: float = Field(default=1.0, ge=0)
    remeasure: int = Field(default=1, ge=0, le=3)
    """Times a trial whose verdicts contradict each other (a higher rate passed where a lower one failed)
    is measured again before it is marked noisy."""
    study: str | None = None
    """The Optuna study's name in ``<workdir>/tune/studies.db`` (default: derived from the search)."""


class ExperimentConfig(Strict):
    model: ModelConfig = ModelConfig()
    workdir: Path = Path("optiserve-work")
    optimizers: tuple[OptimizerEntry, ...] | None = None
    """Applied in order, each to every variant it accepts. None: the model's recommended set
    (`optiserve models` lists it; onnx-export for models that are not built in)."""
    serving: ServingConfig = ServingConfig()
    load: LoadConfig = LoadConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    eval: EvalConfig = EvalConfig()
    cost: CostConfig = CostConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    tune: TuneConfig = TuneConfig()


def _describe(error: Any, model: type[BaseModel]) -> str:
    loc = [str(p) for p in error["loc"]]
    where = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        return f"unknown key {where!r}; allowed here: {', '.join(allowed)}"
    given = error.get("input")
    shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
    return f"{where}: {error['msg']} (got {shown})"


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    current: Any = model
    for key in path:
        if key.isdigit():
            continue
        field = getattr(current, "model_fields", {}).get(key)
        if field is None:
            break
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
    return sorted(getattr(current, "model_fields", {}))


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e.errors()[0], ExperimentConfig)}") from e


def load_config(path: Path | None) -> ExperimentConfig:
    if path is None:
        return ExperimentConfig()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (expected YAML)") from e
    return parse_config(data, str(path))


def with_overrides(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """Apply command-line flags (dotted keys, ``None`` meaning 'not given'), re-validating the result."""
    data = config.model_dump(mode="json")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(data, "command line")


def replica_cpus(allowed: Iterable[int], replicas: int, index: int) -> frozenset[int] | None:
    """The CPUs of replica ``index`` (0-based) of ``replicas`` sharing ``allowed``: contiguous, disjoint
    shares as even as they can be (5 CPUs, 2 replicas: 3 and 2); None (share them all) when there are
    fewer CPUs than replicas."""
    cpus = sorted(allowed)
    if not 0 <= index < replicas:
        raise ValueError(f"replica index {index} outside 0..{replicas - 1}")
    if len(cpus) < replicas:
        return None
    size, extra = divmod(len(cpus), replicas)
    start = index * size + min(index, extra)
    return frozenset(cpus[start : start + size + (1 if index < extra else 0)])


def cpu_split(
    available: list[int], server: tuple[int, ...] | None, generator: tuple[int, ...] | None
) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(server CPUs, generator CPUs): disjoint, so the load generator never steals the server's CPU.

    Defaults: one CPU for the generator and the rest for the server (on 2 CPUs: generator 0, server 1);
    a quarter for the generator from 8 CPUs up; no pinning on a 1-CPU machine. Explicit sets must be
    disjoint and exist on this machine.
    """
    for name, chosen in (("serving.cpus", server), ("load.generator_cpus", generator)):
        if chosen is not None and not set(chosen) <= set(available):
            raise ConfigError(f"{name} {list(chosen)} names CPUs this machine lacks (it has {available})")
    if server is not None and generator is not None and set(server) & set(generator):
        raise ConfigError(f"serving.cpus {list(server)} and load.generator_cpus {list(generator)} overlap")
    if server is None and generator is None and len(available) < 2:
        return None, None
    if generator is None:
        rest = [c for c in available if server is None or c not in server]
        generator = tuple(rest[: max(1, len(available) // 4 if len(available) >= 8 else 1)])
    if server is None:
        server = tuple(c for c in available if c not in generator)
    if not server or not generator:
        raise ConfigError("CPU pinning left the server or the load generator without a CPU")
    return frozenset(server), frozenset(generator)
