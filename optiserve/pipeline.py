"""The stages, each runnable alone: optimize → evaluate → serve + bench → report.

Stages hand off through files under the work directory; :func:`run` chains them. Nothing here
imports a heavy package at module level.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from optiserve.config import ExperimentConfig, OptimizerEntry
from optiserve.errors import ConfigError, DiskFull, LoadTestError, OptiserveError, PluginUnavailable
from optiserve.fsutil import atomic_write_text
from optiserve.manifest import list_variants, read_model, variant_dir, write_model
from optiserve.progress import Steps

if TYPE_CHECKING:
    import numpy as np

    from optiserve.loadtests.scenarios.base import Scenario
    from optiserve.optimizers.base import OptimizeContext
    from optiserve.userdata import UserData

from optiserve.types import (
    BenchResult,
    Endpoint,
    Evaluation,
    LoadSpec,
    ModelSpec,
    ServiceSpec,
    ThreadSpec,
    Variant,
)


@dataclass
class Plan:
    """What a run will do: the variants, the (variant, runtime) pairs, and what is skipped and why."""

    spec: ModelSpec
    variants: list[Variant]
    pairs: list[tuple[Variant, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def resolve(config: ExperimentConfig) -> ModelSpec:
    from optiserve.models.resolve import resolve_model

    m = config.model
    return resolve_model(
        m.ref, input_shape=m.input_shape, input_dtype=m.input_dtype, input_name=m.input_name, name=m.name
    )


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Quantization toolkits print progress to stdout; ours goes to stderr, and stdout is for results."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def optimizer_entries(config: ExperimentConfig, spec: ModelSpec) -> tuple[OptimizerEntry, ...]:
    """The experiment's optimizers, or the model's recommended ones when it names none."""
    from optiserve.models.base import BuiltinModel

    if config.optimizers is not None:
        return config.optimizers
    defaults = BuiltinModel.get(spec.ref).default_optimizers if spec.source == "builtin" else ("onnx-export",)
    return tuple(
        OptimizerEntry(name=d) if isinstance(d, str) else OptimizerEntry(name=d[0], config=d[1])
        for d in defaults
    )


def optimize_context(config: ExperimentConfig) -> OptimizeContext:
    from optiserve.optimizers.base import OptimizeContext

    return OptimizeContext(
        workdir=config.workdir,
        calibration_samples=config.calibration.samples,
        calibration_path=config.calibration.path,
        calibration_data=config.calibration.data,
        preprocess=config.model.preprocess,
        threads=config.eval.threads or os.cpu_count() or 1,
    )


def optimize(config: ExperimentConfig, spec: ModelSpec, steps: Steps) -> tuple[list[Variant], dict[str, str]]:
    """The source variant, then each optimizer applied to every variant it accepts (in config order).

    Bad optimizer names or configs, and an empty calibration set, fail before any work. An optimizer
    whose package is missing, that needs training data the model lacks, or that fails on this model
    (an unsupported op, say) is skipped with the reason, and the others go on.
    """
    from optiserve.optimizers.base import Optimizer
    from optiserve.optimizers.source import materialize_source

    optimizers = [Optimizer.get(entry.name)(entry.config) for entry in optimizer_entries(config, spec)]
    ctx = optimize_context(config)
    skipped: dict[str, str] = {}
    runnable = []
    for opt in optimizers:
        avail = opt.availability()
        if not avail.ok:
            skipped[opt.name] = avail.reason
        elif opt.needs_training_data and ctx.training(spec) is None:
            skipped[opt.name] = f"{spec.name} has no labelled training set to train on"
        else:
            runnable.append(opt)
    if any(opt.needs_calibration for opt in runnable):
        source = config.calibration.data or config.calibration.path
        what = (
            f"calibration samples from {source}"
            if source
            else f"{config.calibration.samples} calibration samples"
        )
        with steps.task(f"Loading {what}"):
            n = len(ctx.calibration(spec))
        steps.note(f"  calibration: {n} samples ({source or 'the model’s calibration split'})")
    with steps.task(f"Loading {spec.name}"):
        variants = [materialize_source(spec, config.workdir)]
    for opt in runnable:
        for parent in list(variants):
            if not opt.accepts(parent):
                continue
            with steps.task(f"{opt.name}: {parent.id}"), _quiet_stdout():
                try:
                    variants.append(opt.apply(parent, config.workdir, ctx))
                except OptiserveError as e:
                    if isinstance(e, PluginUnavailable | ConfigError | DiskFull):
                        raise
                    skipped[f"{opt.name}({parent.id})"] = e.one_line()
    return variants, skipped


def plan(config: ExperimentConfig, spec: ModelSpec, variants: list[Variant], skipped: dict[str, str]) -> Plan:
    """The variant × runtime matrix, computed from the formats each runtime declares."""
    from optiserve.services.runtimes.base import Runtime

    result = Plan(spec=spec, variants=variants, skipped=dict(skipped))
    wanted = config.serving.runtimes
    if wanted:
        for name in wanted:
            Runtime.get(name)  # an unknown runtime is a config error, not a silent skip
    for variant in variants:
        for name, runtime in Runtime.registry().items():
            if not runtime.serves(variant) or (wanted and name not in wanted):
                continue
            avail = runtime.availability()
            if avail.ok:
                result.pairs.append((variant, name))
            else:
                result.skipped[f"{variant.id} on {name}"] = avail.reason
    return result


def remote_plan(
    config: ExperimentConfig, url: str, model_name: str, *, explicit_model: bool
) -> tuple[Plan, str]:
    """(the plan for load-testing a running OIP server, the request encoding it takes).

    ``explicit_model``: the user named a model of ours (``-m``) whose inputs match the server's; its real
    data become the payloads. Otherwise the server's metadata shape the (seeded, synthetic) payloads."""
    from optiserve.deploy.targets.url import describe_remote, probe_encoding, runtime_label
    from optiserve.models.resolve import dataset

    local = resolve(config) if explicit_model else None
    variant = describe_remote(url, model_name, local)
    inputs, _ = dataset(variant.model, "eval", 1)
    encoding = probe_encoding(url, model_name, variant.model.inputs[0].name, inputs[:1])
    runtime = runtime_label(url, model_name)
    return Plan(spec=variant.model, variants=[variant], pairs=[(variant, runtime)]), encoding


def user_eval_set(config: ExperimentConfig, spec: ModelSpec) -> UserData | None:
    """``eval.data`` read and checked (and kept apart from ``calibration.data``), or None."""
    from optiserve import userdata

    if config.eval.data is None:
        return None
    evaluation = userdata.load(
        config.eval.data,
        spec,
        what="eval.data",
        preprocess=config.model.preprocess,
        labels_file=config.eval.labels,
    )
    if config.calibration.data is not None:
        calibration = userdata.load(
            config.calibration.data, spec, what="calibration.data", preprocess=config.model.preprocess
        )
        userdata.check_disjoint(evaluation, calibration, config.eval.data, config.calibration.data)
    return evaluation


def _first_samples(user: UserData, n: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The first ``n`` samples of a user set (of pairs: the first ``n`` pairs, both texts of each)."""
    import numpy as np

    if user.pairs:
        assert user.labels is not None
        total = len(user.labels)
        k = min(n, total)
        inputs = np.concatenate([user.inputs[:k], user.inputs[total : total + k]])
        labels: np.ndarray | None = user.labels[:k]
    else:
        total = len(user.inputs)
        k = min(n, total)
        inputs, labels = user.inputs[:k], None if user.labels is None else user.labels[:k]
    return inputs, labels, user.description if k == total else f"{k} of {user.description}"


def check_user_data(config: ExperimentConfig, spec: ModelSpec) -> None:
    """Read and check the user's eval and calibration sets before any work (bad input: one line, exit 2,
    nothing written)."""
    from optiserve import userdata

    user_eval_set(config, spec)
    if config.calibration.data is not None:
        userdata.load(
            config.calibration.data, spec, what="calibration.data", preprocess=config.model.preprocess
        )


def reference_pair(p: Plan) -> tuple[Variant, str]:
    """The FP32 source variant on its first runtime: what every other pair is compared with. When the
    runtimes asked for (``-r``) leave the source out, it is still evaluated, on a runtime that can."""
    from optiserve.services.runtimes.base import Runtime

    source = next(v for v in p.variants if v.parent_id is None)
    served = next((pair for pair in p.pairs if pair[0].id == source.id), None)
    if served is not None:
        return served
    for name, runtime in Runtime.registry().items():
        if runtime.serves(source) and runtime.availability().ok:
            return source, name
    raise OptiserveError(
        f"no available runtime can run the FP32 source {source.id} to compare the variants with",
        hint="see `optiserve doctor`",
    )


def evaluate(
    config: ExperimentConfig, p: Plan, steps: Steps, run_dir: Path | None = None
) -> dict[tuple[str, str], Evaluation]:
    """Accuracy (and, unless disabled, the in-process microbenchmark) of every pair in the plan.

    Each evaluation is written beside its variant (``evaluation.<runtime>.json``) and, for a run, into
    the run's ``eval/`` folder, from which the report is built.
    """
    from optiserve.evaluate import evaluate_outputs, load_runtime
    from optiserve.microbench import measure
    from optiserve.models.resolve import dataset, stress_dataset, targets

    user = user_eval_set(config, p.spec)
    if user is not None:
        inputs, labels, description = _first_samples(user, config.eval.samples)
        stress_inputs = None
    else:
        inputs, description = dataset(p.spec, "eval", config.eval.samples)
        labels = targets(p.spec, "eval", config.eval.samples)
        stress_inputs = stress_dataset(p.spec, config.eval.stress_samples)
    ref_variant, ref_runtime = reference_pair(p)
    n_threads = config.eval.threads or os.cpu_count() or 1
    threads = ThreadSpec(intra_op=n_threads)
    evaluations: dict[tuple[str, str], Evaluation] = {}
    label = "Evaluating" + (" and microbenchmarking" if config.eval.microbench else "")
    with steps.task(f"{label} on {description}", total=len(p.pairs)) as advance:
        reference = load_runtime(ref_variant, ref_runtime, config.workdir, threads)
        ref_out = reference.infer_any(inputs, chunk=16)
        ref_stress = reference.infer_any(stress_inputs, chunk=16) if stress_inputs is not None else None
        for variant, runtime_name in p.pairs:
            runtime = load_runtime(variant, runtime_name, config.workdir, threads)
            out = runtime.infer_any(inputs, chunk=16)
            stress = (
                (ref_stress, runtime.infer_any(stress_inputs, chunk=16))
                if stress_inputs is not None and ref_stress is not None
                else None
            )
            latency = (
                measure(
                    runtime,
                    inputs[0],
                    threads=n_threads,
                    batch=config.eval.batch,
                    budget_s=config.eval.budget_s,
                )
                if config.eval.microbench
                else None
            )
            ev = evaluate_outputs(
                variant,
                runtime_name,
                ref_variant,
                ref_out,
                out,
                labels,
                gate=config.eval.gate,
                latency=latency,
                data=description,
                stress=stress,
            )
            evaluations[(variant.id, runtime_name)] = ev
            write_model(variant_dir(config.workdir, variant.id) / f"evaluation.{runtime_name}.json", ev)
            if run_dir is not None:
                write_model(run_dir / "eval" / f"{variant.id}.{runtime_name}.json", ev)
            advance(description=f"Evaluated {variant.id} on {runtime_name}")
    return evaluations


def gate(config: ExperimentConfig, p: Plan, evaluations: dict[tuple[str, str], Evaluation]) -> Plan:
    """The plan without pairs that failed the accuracy gate (unless serving.serve_rejected is set)."""
    if config.serving.serve_rejected:
        return p
    kept = []
    skipped = dict(p.skipped)
    for variant, runtime in p.pairs:
        ev = evaluations.get((variant.id, runtime))
        if ev is not None and not ev.passed:
            ci = (
                f", ratio 95% interval [{ev.ratio_ci.low:.3f}, {ev.ratio_ci.high:.3f}]" if ev.ratio_ci else ""
            )
            skipped[f"{variant.id} on {runtime}"] = (
                f"rejected by the accuracy gate: {ev.metric} {ev.value:.4f} < {ev.gate} × "
                f"{ev.reference_value:.4f} (n={ev.n_samples}{ci}; serve it anyway with "
                "serving.serve_rejected: true)"
            )
        else:
            kept.append((variant, runtime))
    return Plan(spec=p.spec, variants=p.variants, pairs=kept, skipped=skipped)


def bench(
    config: ExperimentConfig,
    p: Plan,
    run_dir: Path,
    steps: Steps,
    on_level: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """Serve each pair alone (so pairs never compete for the CPU), with the server and the load
    generator pinned to disjoint CPUs, and drive it through the scenario's levels.

    ``on_level`` sees each level's result once it is written; an exception it raises stops the bench
    there (servers and Prometheus are stopped as on any error): how `tune` prunes a hopeless trial."""
    import os

    from optiserve.config import cpu_split
    from optiserve.deploy.targets.base import configured_target
    from optiserve.loadtests.runner import generator_capacity, level_stem, run_level, write_payloads
    from optiserve.models.resolve import dataset
    from optiserve.prometheus import measurement_source, result_window, server_side_stats

    scenario = scenario_from_config(config)
    scenario.require_available()
    server_cpus, generator_cpus = cpu_split(
        sorted(os.sched_getaffinity(0)), config.serving.cpus, config.load.generator_cpus
    )
    inputs, _ = dataset(p.spec, "eval", config.load.payload_samples)
    payloads = write_payloads(
        run_dir / "payloads.jsonl",
        inputs,
        p.spec.inputs[0].name,
        limit=config.load.payload_samples,
        encoding=config.load.encoding,
    )
    samples_dir = run_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    capacity = None
    if scenario.load_model == "open":
        with steps.task("Measuring the load generator against a null endpoint"):
            capacity = generator_capacity(samples_dir, server_cpus=server_cpus, cpus=generator_cpus)
    deployment = configured_target(config)  # checked before anything starts
    deployment.prepare([service_spec(config, v, rt) for v, rt in p.pairs], steps)
    results: list[BenchResult] = []
    lost = LostMeasurement()
    planned = len(scenario.levels())
    total = len(p.pairs) * (planned + 1)
    with (
        steps.task("Serving and load testing", total=total) as advance,
        # Stopped after the servers (the with block unwinds in reverse).
        measurement_source(config.load.prometheus_url, run_dir, cpus=generator_cpus) as source,
        deployment,
    ):
        atomic_write_text(run_dir / "measurement.txt", source.description + "\n")
        for variant, runtime in p.pairs:
            name = f"{variant.id}.{runtime}"
            advance(0, description=f"Starting {name}")
            endpoint = deployment.start(service_spec(config, variant, runtime), cpus=server_cpus)
            server_metrics = deployment.has_server_metrics(endpoint)
            if server_metrics:
                source.add_target(endpoint)
            else:
                atomic_write_text(
                    run_dir / "measurement.txt",
                    f"client-side only: {endpoint.url} does not expose optiserve's metrics contract\n",
                )
            advance(1)

            def drive(
                load: LoadSpec,
                endpoint: Endpoint = endpoint,
                name: str = name,
                server_metrics: bool = server_metrics,
            ) -> BenchResult:
                load = load.model_copy(update={"encoding": config.load.encoding})
                shape = f"{load.rate_rps:g} req/s" if load.load_model == "open" else f"{load.users} users"
                advance(0, description=f"{name}: {shape} for {load.warmup_s + load.duration_s:.0f}s")
                result = run_level(
                    endpoint,
                    load,
                    payloads,
                    samples_dir,
                    user_class=scenario.user_class or "ClosedLoopUser",
                    cpus=generator_cpus,
                    capacity_rps=capacity,
                    processes=config.load.locust_processes,
                )
                if server_metrics and lost.reason is None:
                    try:
                        server = server_side_stats(source, endpoint, *result_window(result), idle_after=True)
                        result = result.model_copy(update={"server": server})
                    except LoadTestError as e:  # e.g. Prometheus died: the client-side figures still stand
                        lost.lose(e.one_line(), f"{name}, {shape}", run_dir, source.description)
                if server_metrics and result.server is None:
                    result = with_flag(result, f"no server-side figures ({lost.reason}); client-side only")
                write_model(run_dir / "bench" / f"{level_stem(endpoint, load)}.json", result)
                results.append(result)
                advance(1)
                if on_level is not None:
                    on_level(result)
                return result

            scenario.run(drive)
            deployment.stop(endpoint)
    return results


class LostMeasurement:
    """Why server-side figures stopped coming (None while they come). Once lost, later levels do not
    ask again: a dead Prometheus would fail each of them the same way."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def lose(self, reason: str, level: str, run_dir: Path, description: str) -> None:
        import logging

        self.reason = reason
        note = f"{description}; lost from {level} on: {reason} (client-side figures only from there)"
        atomic_write_text(run_dir / "measurement.txt", note + "\n")
        logging.getLogger(__name__).warning("server-side figures lost: %s", reason)


def with_flag(result: BenchResult, flag: str) -> BenchResult:
    """``result`` with one more integrity flag (shown wherever the level's figures are)."""
    integrity = result.integrity.model_copy(update={"flags": (*result.integrity.flags, flag)})
    return result.model_copy(update={"integrity": integrity})


def scenario_from_config(config: ExperimentConfig) -> Scenario:
    """The configured scenario with the experiment's load settings and its own ``scenario_options``."""
    from pydantic import ValidationError

    from optiserve.loadtests.scenarios.base import Scenario

    cls = Scenario.get(config.load.scenario)
    fields = cls.Config.model_fields
    given = {k: v for k, v in config.load.model_dump().items() if k in fields and v is not None}
    try:
        return cls(cls.Config(**{**given, **config.load.scenario_options}))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(
            f"load.scenario_options.{where}: {first['msg']} (scenario {cls.name} takes: {', '.join(fields)})"
        ) from e


def serving_cpus(config: ExperimentConfig) -> frozenset[int] | None:
    """The CPUs ``serve`` pins its servers to: ``serving.cpus`` checked as ``run`` checks it (on this
    machine, disjoint from ``load.generator_cpus``); None (no pinning) when unset."""
    if config.serving.cpus is None:
        return None
    from optiserve.config import cpu_split

    server, _ = cpu_split(sorted(os.sched_getaffinity(0)), config.serving.cpus, config.load.generator_cpus)
    return server


def service_spec(
    config: ExperimentConfig, variant: Variant, runtime: str, port: int | None = None
) -> ServiceSpec:
    """The serving settings for one pair; a model exported with a fixed batch size caps the batcher."""
    batching = config.serving.batching
    fixed = variant.model.inputs[0].fixed_batch
    if fixed == 1:  # BentoML's batcher needs max_batch_size >= 2: a batch-1 model is served unbatched
        batching = batching.model_copy(update={"enabled": False})
    elif fixed is not None and batching.max_batch_size > fixed:
        batching = batching.model_copy(update={"max_batch_size": fixed})
    return ServiceSpec(
        variant=variant,
        variant_dir=str(variant_dir(config.workdir, variant.id).resolve()),
        runtime=runtime,
        batching=batching,
        threads=config.serving.threads,
        limits=config.serving.limits,
        runtime_options=config.serving.runtime_options.get(runtime, {}),
        access_log=config.serving.access_log,
        tracing=config.serving.tracing,
        port=port,
        replicas=config.serving.replicas,
    )


def stored_evaluations(
    config: ExperimentConfig, variants: list[Variant]
) -> dict[tuple[str, str], Evaluation]:
    """The latest evaluation written beside each variant by `optimize` or `run` (for gating `bench`)."""
    found: dict[tuple[str, str], Evaluation] = {}
    for variant in variants:
        for path in variant_dir(config.workdir, variant.id).glob("evaluation.*.json"):
            ev = read_model(path, Evaluation)
            found[(ev.variant_id, ev.runtime)] = ev
    return found


def new_run_dir(workdir: Path, suffix: str = "") -> Path:
    """``<workdir>/results/<UTC stamp>[-n]<suffix>``, created (never an existing one)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = workdir / "results" / f"{stamp}{suffix}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = workdir / "results" / f"{stamp}-{n}{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def load_run(run_dir: Path) -> tuple[list[BenchResult], list[Evaluation], dict[str, str]]:
    results = [read_model(f, BenchResult) for f in sorted((run_dir / "bench").glob("*.json"))]
    evaluations = [read_model(f, Evaluation) for f in sorted((run_dir / "eval").glob("*.json"))]
    skipped_file = run_dir / "skipped.json"
    skipped: dict[str, str] = {}
    if skipped_file.is_file():
        import json

        skipped = json.loads(skipped_file.read_text())
    return results, evaluations, skipped


def known_variants(workdir: Path) -> dict[str, Variant]:
    return {v.id: v for v in list_variants(workdir)}
