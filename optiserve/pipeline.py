"""The stages, each runnable alone: optimize → evaluate → serve + bench → report.

Stages hand off through files under the work directory; :func:`run` chains them. Nothing here
imports a heavy package at module level.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from optiserve.config import ExperimentConfig
from optiserve.errors import OptiserveError, PluginUnavailable
from optiserve.manifest import list_variants, read_model, variant_dir, write_model
from optiserve.progress import Steps
from optiserve.types import BenchResult, Evaluation, ModelSpec, ServiceSpec, Variant


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


def optimize(config: ExperimentConfig, spec: ModelSpec, steps: Steps) -> tuple[list[Variant], dict[str, str]]:
    """The source variant, then each optimizer applied to every variant it accepts (in config order)."""
    from optiserve.optimizers.base import Optimizer
    from optiserve.optimizers.source import materialize_source

    optimizers = [
        Optimizer.get(entry.name)(entry.config) for entry in config.optimizers
    ]  # bad names fail first
    skipped: dict[str, str] = {}
    with steps.task(f"Loading {spec.name}"):
        variants = [materialize_source(spec, config.workdir)]
    for opt in optimizers:
        avail = opt.availability()
        if not avail.ok:
            skipped[opt.name] = avail.reason
            continue
        for parent in list(variants):
            if not opt.accepts(parent):
                continue
            with steps.task(f"{opt.name}: {parent.id}"):
                try:
                    variants.append(opt.apply(parent, config.workdir))
                except OptiserveError as e:
                    if isinstance(e, PluginUnavailable):
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


def reference_pair(p: Plan) -> tuple[Variant, str]:
    """The FP32 source variant on its first runtime: what every other pair is compared with."""
    source = next(v for v in p.variants if v.parent_id is None)
    return next(pair for pair in p.pairs if pair[0].id == source.id)


def evaluate(
    config: ExperimentConfig, p: Plan, run_dir: Path, steps: Steps
) -> dict[tuple[str, str], Evaluation]:
    from optiserve.evaluate import compare, outputs_of
    from optiserve.models.resolve import dataset

    inputs, description = dataset(p.spec, "eval", config.eval.samples)
    ref_variant, ref_runtime = reference_pair(p)
    threads = config.serving.threads
    evaluations: dict[tuple[str, str], Evaluation] = {}
    with steps.task(f"Evaluating on {description}", total=len(p.pairs)) as advance:
        ref_out = outputs_of(ref_variant, ref_runtime, config.workdir, inputs, threads)
        for variant, runtime in p.pairs:
            out = (
                ref_out
                if (variant.id, runtime) == (ref_variant.id, ref_runtime)
                else outputs_of(variant, runtime, config.workdir, inputs, threads)
            )
            ev = compare(variant, runtime, ref_variant, ref_out, out)
            evaluations[(variant.id, runtime)] = ev
            write_model(run_dir / "eval" / f"{variant.id}.{runtime}.json", ev)
            advance(description=f"Evaluated {variant.id} on {runtime}")
    return evaluations


def bench(config: ExperimentConfig, p: Plan, run_dir: Path, steps: Steps) -> list[BenchResult]:
    """Serve each pair alone (so pairs never compete for the CPU) and drive it at every load level."""
    from optiserve.deploy.local import LocalDeployment
    from optiserve.loadtests.runner import run_level, write_payloads
    from optiserve.loadtests.scenarios.base import Scenario
    from optiserve.loadtests.scenarios.closed_loop import ClosedLoopConfig
    from optiserve.models.resolve import dataset

    scenario_cls = Scenario.get(config.load.scenario)
    scenario_cls.require_available()
    scenario = scenario_cls(
        ClosedLoopConfig(  # type: ignore[call-arg]
            concurrency=config.load.concurrency,
            duration_s=config.load.duration_s,
            warmup_s=config.load.warmup_s,
        )
    )
    levels = scenario.levels()
    inputs, _ = dataset(p.spec, "eval", config.load.payload_samples)
    payloads = write_payloads(run_dir / "payloads.jsonl", inputs, limit=config.load.payload_samples)
    results: list[BenchResult] = []
    total = len(p.pairs) * (len(levels) + 1)
    with (
        steps.task("Serving and load testing", total=total) as advance,
        LocalDeployment(config.workdir, ready_timeout_s=config.serving.ready_timeout_s) as deployment,
    ):
        for variant, runtime in p.pairs:
            name = f"{variant.id}.{runtime}"
            advance(0, description=f"Starting {name}")
            endpoint = deployment.start(service_spec(config, variant, runtime))
            advance(1)
            for load in levels:
                advance(
                    0, description=f"{name}: {load.users} users for {load.warmup_s + load.duration_s:.0f}s"
                )
                result = run_level(
                    endpoint, load, payloads, run_dir / "samples", user_class=scenario.user_class
                )
                write_model(run_dir / "bench" / f"{name}.{load.scenario}.u{load.users}.json", result)
                results.append(result)
                advance(1)
            deployment.stop(name)
    return results


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
        port=port,
    )


def new_run_dir(workdir: Path) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = workdir / "results" / stamp
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = workdir / "results" / f"{stamp}-{n}"
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
