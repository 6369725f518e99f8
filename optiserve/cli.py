"""The ``optiserve`` command line. Every command has ``--help`` with an example.

Errors from the :mod:`optiserve.errors` tree become one red line and their exit code, never a
traceback; Ctrl-C or SIGTERM stops every child process and exits 130.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optiserve.config import ExperimentConfig, load_config, with_overrides
from optiserve.errors import ConfigError, Interrupted, OptiserveError
from optiserve.progress import Steps, console

app = typer.Typer(
    name="optiserve",
    help="Optimize a model into variants, serve each with BentoML, load-test them and report.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # stdout: tables and results

ConfigArg = Annotated[Path | None, typer.Argument(help="Experiment YAML file (optional; flags override it).")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Built-in name, path to .onnx, or module:callable.")
]
WorkdirOpt = Annotated[Path | None, typer.Option("--workdir", "-w", help="Where variants and results go.")]
ConcurrencyOpt = Annotated[
    str | None, typer.Option("--concurrency", "-c", help="Closed-loop users, comma-separated: 1,4,8.")
]
DurationOpt = Annotated[float | None, typer.Option("--duration", help="Measured seconds per load level.")]
WarmupOpt = Annotated[float | None, typer.Option("--warmup", help="Warm-up seconds per level (discarded).")]
RuntimeOpt = Annotated[
    list[str] | None, typer.Option("--runtime", "-r", help="Only these runtimes (repeatable).")
]
OptimizerOpt = Annotated[
    list[str] | None, typer.Option("--optimizer", "-o", help="Optimizers to apply (repeatable).")
]
EvalOpt = Annotated[
    int | None, typer.Option("--eval-samples", help="Held-out samples for the accuracy check.")
]
PrometheusUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--prometheus-url",
        help="Read server-side figures from this Prometheus (it must scrape the services); "
        "default: start `prometheus` if on PATH, else scrape /metrics directly.",
    ),
]
VariantOpt = Annotated[
    list[str] | None,
    typer.Option("--variant", "-v", help="Variant ids, repeatable (default: all that passed the gate)."),
]
ScenarioOpt = Annotated[
    str | None,
    typer.Option("--scenario", "-s", help="closed-loop (default), open-loop, slo-search, ramp or spike."),
]
RateOpt = Annotated[
    str | None, typer.Option("--rate", help="Open-loop rates in req/s, comma-separated: 10,50.")
]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        "-t",
        help="Where to serve: local (processes, default), docker (the images of `build --containerize`, "
        "run as the chart's pods) or kubernetes.",
    ),
]
InputShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", help="Per-sample shape for module:callable: 3,224,224.")
]
ReplicasOpt = Annotated[
    int | None,
    typer.Option(
        "--replicas",
        help="Replicas per variant (serving.replicas): worker processes of one server, each on its own "
        "share of the CPUs (pods on kubernetes).",
    ),
]


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise ConfigError(f"{what} must be comma-separated whole numbers, e.g. 1,4,8 (got {text!r})") from e
    if not values:
        raise ConfigError(f"{what} is empty")
    return values


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise ConfigError(f"{what} must be comma-separated numbers, e.g. 10,50 (got {text!r})") from e
    if not values or min(values) <= 0:
        raise ConfigError(f"{what} needs positive numbers (got {text!r})")
    return values


def _config(
    path: Path | None,
    *,
    model: str | None = None,
    workdir: Path | None = None,
    concurrency: str | None = None,
    duration: float | None = None,
    warmup: float | None = None,
    runtimes: list[str] | None = None,
    optimizers: list[str] | None = None,
    eval_samples: int | None = None,
    input_shape: str | None = None,
    prometheus_url: str | None = None,
    scenario: str | None = None,
    rates: str | None = None,
    target: str | None = None,
    replicas: int | None = None,
    preset: dict[str, Any] | None = None,
) -> ExperimentConfig:
    overrides: dict[str, Any] = {
        "serving.target": target,
        "serving.replicas": replicas,
        "load.scenario": scenario,
        "load.rates": _floats(rates, "--rate"),
        "model.ref": model,
        "model.input_shape": _ints(input_shape, "--input-shape"),
        "workdir": str(workdir) if workdir else None,
        "load.concurrency": _ints(concurrency, "--concurrency"),
        "load.duration_s": duration,
        "load.warmup_s": warmup,
        "serving.runtimes": runtimes or None,
        "optimizers": [{"name": n} for n in optimizers] if optimizers else None,
        "eval.samples": eval_samples,
        "load.prometheus_url": prometheus_url,
    }
    return with_overrides(with_overrides(load_config(path), preset or {}), overrides)


QUICK: dict[str, Any] = {
    "eval.samples": 256,
    "eval.stress_samples": 32,
    "eval.budget_s": 0.5,
    "calibration.samples": 128,
    "load.concurrency": [1, 4],
    "load.duration_s": 4.0,
    "load.warmup_s": 1.0,
    "load.rates": [10.0, 40.0],
}
"""``run --quick``: what a smoke run trims (over the YAML; explicit flags still win)."""


@app.command()
def run(
    config: ConfigArg = None,
    model: ModelOpt = None,
    workdir: WorkdirOpt = None,
    concurrency: ConcurrencyOpt = None,
    duration: DurationOpt = None,
    warmup: WarmupOpt = None,
    runtime: RuntimeOpt = None,
    target: TargetOpt = None,
    replicas: ReplicasOpt = None,
    optimizer: OptimizerOpt = None,
    eval_samples: EvalOpt = None,
    input_shape: InputShapeOpt = None,
    scenario: ScenarioOpt = None,
    rate: RateOpt = None,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Fewer samples and shorter load levels: a smoke run in minutes."),
    ] = False,
    prometheus_url: PrometheusUrlOpt = None,
) -> None:
    """Optimize → evaluate → serve → load test → report, end to end.

    Example: [bold]optiserve run --model efficientnet-lite0 --concurrency 1,4 --duration 10[/]
    """
    from optiserve import pipeline
    from optiserve.report import render_table
    from optiserve.run_manifest import finish_run, start_run, write_run_report

    cfg = _config(
        config,
        model=model,
        workdir=workdir,
        concurrency=concurrency,
        duration=duration,
        warmup=warmup,
        runtimes=runtime,
        optimizers=optimizer,
        eval_samples=eval_samples,
        input_shape=input_shape,
        scenario=scenario,
        rates=rate,
        target=target,
        replicas=replicas,
        preset=QUICK if quick else None,
        prometheus_url=prometheus_url,
    )
    _check_prices(cfg)
    steps = Steps()
    spec = pipeline.resolve(cfg)
    _check_plugins(cfg)
    pipeline.check_user_data(cfg, spec)
    variants, skipped = pipeline.optimize(cfg, spec, steps)
    plan = pipeline.plan(cfg, spec, variants, skipped)
    if not plan.pairs:
        raise OptiserveError(
            "no variant can be served by an available runtime", hint="see `optiserve doctor`"
        )
    run_dir = pipeline.new_run_dir(cfg.workdir)
    manifest = start_run(cfg, spec.name, run_dir)
    evaluations = pipeline.evaluate(cfg, plan, steps, run_dir)
    served = pipeline.gate(cfg, plan, evaluations)
    _write_json(run_dir / "skipped.json", served.skipped)
    if not served.pairs:
        raise OptiserveError(
            "every variant was rejected by the accuracy gate", hint=f"see {run_dir / 'eval'}"
        )
    pipeline.bench(cfg, served, run_dir, steps)
    finish_run(run_dir, manifest, variants)
    report, (json_path, md_path, html_path), _ = write_run_report(run_dir)
    out.print(render_table(report))
    _print_skipped(served.skipped)
    out.print(
        f"Report: {md_path}  (and {json_path.name}, {html_path.name}; raw samples in {run_dir / 'samples'})"
    )


@app.command()
def optimize(
    config: ConfigArg = None,
    model: ModelOpt = None,
    workdir: WorkdirOpt = None,
    optimizer: OptimizerOpt = None,
    eval_samples: EvalOpt = None,
    input_shape: InputShapeOpt = None,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate and microbenchmark every variant.")
    ] = True,
) -> None:
    """Produce the variants of a model (cached by content id), evaluate each against FP32 and list them.

    Example: [bold]optiserve optimize --model efficientnet-lite0 -o onnx-export -o ort-int8-static[/]
    """
    from optiserve import pipeline
    from optiserve.report import render_variants_table

    cfg = _config(
        config,
        model=model,
        workdir=workdir,
        optimizers=optimizer,
        eval_samples=eval_samples,
        input_shape=input_shape,
    )
    spec = pipeline.resolve(cfg)
    _check_plugins(cfg)
    pipeline.check_user_data(cfg, spec)
    steps = Steps()
    variants, skipped = pipeline.optimize(cfg, spec, steps)
    plan = pipeline.plan(cfg, spec, variants, skipped)
    evaluations = pipeline.evaluate(cfg, plan, steps) if evaluate and plan.pairs else {}
    out.print(render_variants_table(spec.name, plan, evaluations))


@app.command()
def serve(
    config: ConfigArg = None,
    model: ModelOpt = None,
    workdir: WorkdirOpt = None,
    runtime: RuntimeOpt = None,
    target: TargetOpt = None,
    replicas: ReplicasOpt = None,
    input_shape: InputShapeOpt = None,
    variant: VariantOpt = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Port of the first server (next ones count up).")
    ] = None,
    seconds: Annotated[
        float | None, typer.Option("--for", help="Stop after this many seconds (default: Ctrl-C).")
    ] = None,
) -> None:
    """Serve variants that `optiserve optimize` produced until Ctrl-C: one `bentoml serve` process each
    (or, with --target docker, one container each), with the config's serving settings: runtime
    threads (serving.threads), batching, limits, and CPUs (serving.cpus, as `run` pins its servers;
    unset: no pinning, since no load generator shares the machine).

    Example: [bold]optiserve serve --model efficientnet-lite0 --runtime onnxruntime[/]
    then [bold]curl -s localhost:PORT/readyz[/]
    """
    from optiserve import pipeline
    from optiserve.deploy.targets.base import configured_target

    cfg = _config(
        config,
        model=model,
        workdir=workdir,
        runtimes=runtime,
        input_shape=input_shape,
        target=target,
        replicas=replicas,
    )
    cpus = pipeline.serving_cpus(cfg)
    p = _existing_plan(cfg, variant)
    with configured_target(cfg) as deployment:
        table = Table(title="Serving (Ctrl-C stops every server)")
        for col in (
            "variant",
            "runtime",
            "url",
            "Open Inference Protocol infer path",
            "CPUs",
            "replicas",
            "threads",
        ):
            table.add_column(col)
        threads = cfg.serving.threads
        with Steps().task("Starting servers", total=len(p.pairs)) as advance:
            for i, (v, rt) in enumerate(p.pairs):
                spec = pipeline.service_spec(cfg, v, rt, (port + i) if port else None)
                endpoint = deployment.start(spec, cpus=cpus)
                table.add_row(
                    v.id,
                    rt,
                    endpoint.url,
                    endpoint.infer_url.removeprefix(endpoint.url),
                    ",".join(map(str, sorted(cpus))) if cpus else "any",
                    str(spec.replicas),
                    f"{threads.intra_op} intra-op, {threads.inter_op} inter-op",
                )
                advance()
        out.print(table)
        deadline = time.monotonic() + seconds if seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)


@app.command()
def build(
    config: ConfigArg = None,
    model: ModelOpt = None,
    workdir: WorkdirOpt = None,
    runtime: RuntimeOpt = None,
    input_shape: InputShapeOpt = None,
    variant: VariantOpt = None,
    containerize: Annotated[
        bool,
        typer.Option(
            "--containerize",
            help="Also build an image per Bento, <variant id>:<runtime>, on a Debian base image built "
            "here (needs docker).",
        ),
    ] = False,
) -> None:
    """Package each variant × runtime as a Bento: the generic service, the artifact and its manifest,
    the ServiceSpec, Python dependencies pinned to this machine's versions, and the Dockerfile.

    Example: [bold]optiserve build --model efficientnet-lite0 --runtime onnxruntime[/]
    then [bold]bentoml serve <tag>[/] (or [bold]--containerize[/] where a container engine exists)
    """
    import tempfile

    from optiserve import pipeline
    from optiserve.deploy.bento import build_bento, build_wheel

    cfg = _config(config, model=model, workdir=workdir, runtimes=runtime, input_shape=input_shape)
    p = _existing_plan(cfg, variant)
    if containerize:  # before anything is built: no engine is one line, exit 5
        from optiserve.deploy.engine import require_engine

        require_engine()
    table = Table(title="Bentos" + (" and images" if containerize else ""))
    for col in ("bento tag", "runtime", "pinned packages", "image" if containerize else "Dockerfile"):
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="optiserve-wheel.") as tmp:
        steps = Steps()
        with steps.task("Building Bentos", total=len(p.pairs) + 1) as advance:
            wheel = build_wheel(Path(tmp))
            advance()
            built = []
            for v, rt in p.pairs:
                built.append(build_bento(pipeline.service_spec(cfg, v, rt), wheel))
                advance()
        if not containerize:
            for bento in built:
                table.add_row(
                    bento.tag, bento.labels["runtime"], str(len(bento.requirements)), str(bento.dockerfile)
                )
        else:
            from optiserve.deploy.images import build_image

            log = cfg.workdir / "images" / "build.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")
            with steps.task(
                "Building images (the first one also builds the base image)", total=len(built)
            ) as advance:
                for bento in built:
                    advance(0, description=f"docker build {bento.tag}")
                    image = build_image(bento, wheel, log)
                    table.add_row(
                        bento.tag,
                        bento.labels["runtime"],
                        str(len(bento.requirements)),
                        f"{image.tag}  {image.size_bytes / 1e6:.0f} MB  built in {image.build_s:.0f}s"
                        + (f" (with the base image {image.base})" if image.base_built else ""),
                    )
                    advance()
    out.print(table)


@app.command()
def bench(
    config: ConfigArg = None,
    model: ModelOpt = None,
    workdir: WorkdirOpt = None,
    concurrency: ConcurrencyOpt = None,
    duration: DurationOpt = None,
    warmup: WarmupOpt = None,
    runtime: RuntimeOpt = None,
    target: TargetOpt = None,
    replicas: ReplicasOpt = None,
    input_shape: InputShapeOpt = None,
    variant: VariantOpt = None,
    scenario: ScenarioOpt = None,
    rate: RateOpt = None,
    in_cluster: Annotated[
        bool,
        typer.Option(
            "--in-cluster", help="Collect the chart's in-cluster Locust run (deploy with loadgen.enabled)."
        ),
    ] = False,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="With --in-cluster.")] = "default",
    release: Annotated[
        str, typer.Option("--release", help="With --in-cluster: the Helm release.")
    ] = "optiserve",
    prometheus_url: PrometheusUrlOpt = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Load-test this running Open Inference Protocol v2 server (Triton, KServe, MLServer, ours) "
            "instead of serving variants; needs --model-name.",
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="With --url: the model's name on that server.")
    ] = None,
    encoding: Annotated[
        str | None,
        typer.Option(
            "--encoding",
            help="Request encoding: binary (the binary tensor extension) or json; with --url, default: "
            "binary where the server takes it, else json.",
        ),
    ] = None,
) -> None:
    """Load-test variants that already exist (serve each, drive it with Locust) and write a report.

    Example: [bold]optiserve bench --model efficientnet-lite0 -c 1,8 --duration 20[/]
    """
    from optiserve import pipeline
    from optiserve.manifest import write_model
    from optiserve.report import render_table
    from optiserve.run_manifest import finish_run, start_run, write_run_report

    cfg = _config(
        config,
        model=model,
        workdir=workdir,
        concurrency=concurrency,
        duration=duration,
        warmup=warmup,
        runtimes=runtime,
        input_shape=input_shape,
        scenario=scenario,
        rates=rate,
        prometheus_url=prometheus_url,
        target="url" if url else target,
        replicas=replicas,
    )
    if encoding is not None:
        cfg = with_overrides(cfg, {"load.encoding": encoding})
    if url:
        if not model_name:
            raise ConfigError("--url needs --model-name: the model's name on that server")
        if replicas is not None:
            raise ConfigError("--replicas does not apply to --url: that server is already running as it is")
        cfg = with_overrides(cfg, {"serving.url": url})
        p, chosen = pipeline.remote_plan(
            cfg, url, model_name, explicit_model=model is not None or config is not None
        )
        cfg = with_overrides(cfg, {"load.encoding": encoding or chosen})
    else:
        p = _existing_plan(cfg, variant)
    _check_prices(cfg)
    if in_cluster:  # before anything is written
        from optiserve.deploy.k8s import require_cluster

        require_cluster()
    run_dir = pipeline.new_run_dir(cfg.workdir)
    manifest = start_run(cfg, p.spec.name, run_dir)
    _write_json(run_dir / "skipped.json", p.skipped)
    if in_cluster:  # written where the report reads results from, as bench writes its own
        write_model(
            run_dir / "bench" / "in-cluster.json", _in_cluster_result(cfg, p, run_dir, release, namespace)
        )
    else:
        pipeline.bench(cfg, p, run_dir, Steps())
    # The accuracy figures are the latest ones `optimize`/`run` wrote beside each benchmarked variant.
    served = {(v.id, rt) for v, rt in p.pairs}
    evaluations = [ev for key, ev in pipeline.stored_evaluations(cfg, p.variants).items() if key in served]
    for ev in evaluations:
        write_model(run_dir / "eval" / f"{ev.variant_id}.{ev.runtime}.json", ev)
    finish_run(run_dir, manifest, p.variants)
    report, (_, md_path, _), _ = write_run_report(run_dir)
    out.print(render_table(report))
    out.print(f"Report: {md_path}")


@app.command()
def tune(
    config: ConfigArg = None,
    model: ModelOpt = None,
    workdir: WorkdirOpt = None,
    target: TargetOpt = None,
    input_shape: InputShapeOpt = None,
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="grid, random or bayesian (Optuna's TPE; the default).")
    ] = None,
    trials: Annotated[
        int | None, typer.Option("--trials", help="Trials to measure (default: grid size, or a third of it).")
    ] = None,
    slo: Annotated[float | None, typer.Option("--slo", help="The p99 bound in ms (load.slo_ms).")] = None,
    offered_rps: Annotated[
        float | None,
        typer.Option("--rps", help="Target rate to serve (cost.offered_rps; default: each one's highest)."),
    ] = None,
) -> None:
    """Search variant × runtime × batch size × batching deadline × threads/streams for the cheapest
    configuration whose p99 meets the SLO; write the Pareto front, a recommended config and Helm values.

    Example: [bold]optiserve tune --model efficientnet-lite0 --slo 50 --strategy bayesian --trials 8[/]
    """
    from optiserve import pipeline
    from optiserve.config import cpu_split
    from optiserve.cost import load_prices
    from optiserve.errors import SloNotMet
    from optiserve.tune.outcome import closest, recommended, write_outputs
    from optiserve.tune.space import build_space
    from optiserve.tune.study import run_study

    cfg = _config(config, model=model, workdir=workdir, target=target, input_shape=input_shape)
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "tune.strategy": strategy,
            "tune.trials": trials,
            "load.slo_ms": slo,
            "cost.offered_rps": offered_rps,
        }.items()
        if v is not None
    }
    cfg = with_overrides(cfg, overrides) if overrides else cfg
    prices = load_prices(cfg.cost.prices)
    p = _existing_plan(cfg, None)  # build_space narrows it to tune.space, naming that key when it can't
    server_cpus, _ = cpu_split(sorted(os.sched_getaffinity(0)), cfg.serving.cpus, cfg.load.generator_cpus)
    space = build_space(cfg, p, len(server_cpus) if server_cpus else os.cpu_count() or 1)
    instance = cfg.cost.instance or prices.default_instance()
    prices.get(instance)  # an unknown instance fails here, not after the search
    stored = pipeline.stored_evaluations(cfg, p.variants)
    out_dir = pipeline.new_run_dir(cfg.workdir, suffix="-tune")
    steps = Steps()
    steps.note(f"Search space: {space.describe()}; strategy {cfg.tune.strategy}")
    study = run_study(
        cfg, p, space, out_dir, prices=prices, instance=instance, evaluations=stored, steps=steps
    )
    written = write_outputs(cfg, study, space, out_dir)
    out.print(written["md"].read_text().split("\n", 2)[2])
    best = recommended(study.outcomes)
    if best is None:
        lines = closest(study.outcomes)
        raise SloNotMet(
            f"no configuration of the {len(study.outcomes)} measured met p99 <= {cfg.load.slo_ms:g} ms"
            + (f"; closest: {lines[0]}" if lines else ""),
            hint=f"see {written['md']}; relax --slo or widen tune.space",
        )
    out.print(f"Recommended config: {written['config']}  Helm values: {written['values']}")
    out.print(f"Deploy it: optiserve deploy --values {written['values']}   Report: {written['html']}")


@app.command()
def compare(
    a: Annotated[
        str, typer.Argument(help="Variant A: an id, optionally @runtime (default: its first runtime).")
    ],
    b: Annotated[str, typer.Argument(help="Variant B, the same way (may be A's id on another runtime).")],
    config: Annotated[Path | None, typer.Option("--config", help="Experiment YAML file.")] = None,
    model: ModelOpt = None,
    workdir: WorkdirOpt = None,
    target: TargetOpt = None,
    concurrency: ConcurrencyOpt = None,
    duration: DurationOpt = None,
    warmup: WarmupOpt = None,
    scenario: ScenarioOpt = None,
    rate: RateOpt = None,
    input_shape: InputShapeOpt = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Interleaved runs of each side (>= 2).")] = 4,
) -> None:
    """A/B: serve A and B, run the same load level on each in alternating order, and report the
    differences in p50, p99 and throughput with 95% confidence intervals and a verdict. A and B may
    be the same variant and runtime (an A/A test: two servers, which should show no difference).

    Example: [bold]optiserve compare efficientnet-lite0.onnx.c57e0c efficientnet-lite0.torch.a68522 -c 4[/]
    """
    from optiserve import pipeline
    from optiserve.compare import Side, render_markdown, run_comparison
    from optiserve.fsutil import atomic_write_text

    cfg = _config(
        config,
        model=model,
        workdir=workdir,
        concurrency=concurrency,
        duration=duration,
        warmup=warmup,
        input_shape=input_shape,
        scenario=scenario,
        rates=rate,
        target=target,
    )
    p = _existing_plan(with_overrides(cfg, {"serving.variants": None}), None)  # A and B name theirs
    variants = {v.id: v for v in p.variants}
    sides = []
    for ref in (a, b):
        vid, _, rt = ref.partition("@")
        if vid not in variants:
            raise ConfigError(
                f"unknown variant {vid!r} in {cfg.workdir}; known: {', '.join(variants) or '(none)'}"
            )
        servable = [r for v, r in p.pairs if v.id == vid]
        if not servable:
            raise ConfigError(
                f"{vid} cannot be served here (rejected by the gate, or no runtime): see `optiserve optimize`"
            )
        if rt and rt not in servable:
            raise ConfigError(f"{vid} is not served by {rt!r}; it can be: {', '.join(servable)}")
        sides.append(Side(vid, rt or servable[0]))
    run_dir = pipeline.new_run_dir(cfg.workdir)
    result = run_comparison(cfg, sides[0], sides[1], variants, repeats, run_dir, Steps())
    _write_json(run_dir / "compare.json", result.model_dump(mode="json"))
    atomic_write_text(run_dir / "compare.md", render_markdown(result))
    table = Table(
        title=f"A = {result.a}   B = {result.b}   ({result.repeats} interleaved repeats, {result.load})"
    )
    for col in ("metric", "A", "B", "B vs A", "95% CI", "verdict"):
        table.add_column(col)
    for m in result.metrics:
        table.add_row(
            m.metric,
            f"{m.a:.2f}",
            f"{m.b:.2f}",
            f"{m.relative_diff:+.1%}",
            f"[{m.ci_low:+.1%}, {m.ci_high:+.1%}]",
            m.verdict,
        )
    out.print(table)
    out.print(f"Verdict (p50): {result.verdict}")
    out.print(f"Details: {run_dir / 'compare.md'}")


@app.command()
def report(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A results folder (default: the latest in the workdir).")
    ] = None,
    workdir: WorkdirOpt = None,
) -> None:
    """Rebuild report.json, report.md and report.html from a run's result files, and print the table.

    Example: [bold]optiserve report optiserve-work/results/20261125-120000[/]
    """
    from optiserve.report import render_table
    from optiserve.run_manifest import MANIFEST_FILE, write_run_report

    if run_dir is None:
        cfg = _config(None, workdir=workdir)
        runs = (
            sorted(p for p in (cfg.workdir / "results").glob("*") if p.is_dir())
            if (cfg.workdir / "results").is_dir()
            else []
        )
        if not runs:
            raise ConfigError(f"no runs in {cfg.workdir / 'results'}", hint="run `optiserve run` first")
        run_dir = runs[-1]
    if not (run_dir / "bench").is_dir() and not (run_dir / "eval").is_dir():
        raise ConfigError(f"{run_dir} is not a results folder (expected bench/ and eval/ inside)")
    rep, (_, md_path, _), manifest = write_run_report(run_dir)
    out.print(render_table(rep))
    if manifest is None:
        out.print(
            f"[yellow]warning:[/] {run_dir} has no {MANIFEST_FILE} (a run made before runs were recorded): "
            "costed with the default SLO, instance and prices, and the workdir's current variants"
        )
    out.print(f"Report: {md_path}")


@app.command()
def doctor() -> None:
    """List every plugin and external tool, available or not, with the reason.

    Example: [bold]optiserve doctor[/]
    """
    from optiserve.doctor import plugin_rows, tool_rows

    table = Table(title="optiserve doctor")
    for col in ("kind", "name", "status", "details"):
        table.add_column(col, overflow="fold")
    for kind, name, ok, why in [*plugin_rows(), *tool_rows()]:
        table.add_row(kind, name, "[green]available[/]" if ok else "[red]unavailable[/]", escape(why))
    out.print(table)


@app.command()
def models() -> None:
    """List the built-in models, and the other forms `--model` accepts.

    Example: [bold]optiserve models[/]
    """
    from optiserve.models.base import BuiltinModel

    table = Table(title="Built-in models (`--model NAME`)")
    for col in ("name", "description", "input", "status"):
        table.add_column(col, overflow="fold")
    for name, cls in BuiltinModel.registry().items():
        avail = cls.availability()
        shape = "–"
        if avail.ok:
            shape = " × ".join("N" if d is None else str(d) for d in cls.spec().inputs[0].shape)
        table.add_row(name, escape(cls.description), shape, "available" if avail.ok else escape(avail.reason))
    out.print(table)
    out.print("Also: --model path/to/model.onnx, or --model package.module:factory --input-shape 3,224,224")


@app.command()
def deploy(
    config: ConfigArg = None,
    model: ModelOpt = None,
    workdir: WorkdirOpt = None,
    runtime: RuntimeOpt = None,
    input_shape: InputShapeOpt = None,
    variant: VariantOpt = None,
    image_repository: Annotated[
        str,
        typer.Option(
            "--image-repository", help="Registry prefix of the Bento images: <repo>/<variant id>:<runtime>."
        ),
    ] = "",
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", help="A/B traffic split, summing to 100: id=90,id2=10 (id@runtime if needed)."
        ),
    ] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Kubernetes namespace.")] = "default",
    release: Annotated[str, typer.Option("--release", help="Helm release name.")] = "optiserve",
    render_dir: Annotated[
        Path | None,
        typer.Option("--render", help="Write one manifest per object into this folder (no cluster needed)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="helm upgrade --install --dry-run=server: validate, change nothing."),
    ] = False,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="Seconds to wait for every Deployment to be ready.")
    ] = 600,
    set_values: Annotated[
        list[str] | None,
        typer.Option("--set", help="Chart value KEY=VALUE (repeatable): --set monitoring.enabled=true."),
    ] = None,
    values_file: Annotated[
        Path | None,
        typer.Option(
            "--values", help="Install these chart values as they are (e.g. `tune`'s recommendation)."
        ),
    ] = None,
) -> None:
    """Deploy servable variants to Kubernetes with the helm/optiserve chart: one Deployment + Service
    each, from the Bento images of `optiserve build --containerize`. The values it renders are written
    to <workdir>/deploy/values.yaml; --render DIR writes the manifests without a cluster.

    Example: [bold]optiserve deploy -m efficientnet-lite0 --image-repository registry.example.com/ml[/]
    """
    from optiserve import pipeline
    from optiserve.deploy import k8s

    cfg = _config(config, model=model, workdir=workdir, runtimes=runtime, input_shape=input_shape)
    if values_file is not None:
        ignored = [
            f
            for f, given in (
                ("--variant", variant),
                ("--weights", weights),
                ("--image-repository", image_repository),
            )
            if given
        ]
        if ignored:
            raise ConfigError(
                f"--values installs the chart values as they are; drop {', '.join(ignored)} (or --values)"
            )
        values = k8s.read_values(values_file)
    else:
        p = _existing_plan(cfg, variant)
        specs = [pipeline.service_spec(cfg, v, rt) for v, rt in p.pairs]
        values = k8s.build_values(
            specs,
            repository=image_repository,
            weights=k8s.parse_weights(weights),
            payloads=_loadgen_payloads(cfg, p.spec),
            baked={(s.variant.id, s.runtime): k8s.baked_spec(s) for s in specs},
        )
    k8s.apply_sets(values, set_values or [])
    values_path = k8s.write_values(values, cfg.workdir / "deploy" / "values.yaml")
    target = k8s.Target(release=release, namespace=namespace)
    if render_dir is not None:
        objects = k8s.render(values_path, target)
        paths = k8s.write_manifests(objects, render_dir)
        out.print(f"Rendered {len(paths)} objects into {render_dir} (values: {values_path})")
        return
    k8s.require_cluster()
    with Steps().task(f"helm upgrade --install {release}{' (dry run)' if dry_run else ''}"):
        k8s.install(values_path, target, dry_run=dry_run, wait_timeout_s=wait_timeout)
    table = Table(title=f"Deployed to namespace {namespace}{' (dry run)' if dry_run else ''}")
    for col in ("variant", "runtime", "in-cluster URL"):
        table.add_column(col)
    for ep in k8s.endpoints(k8s.render(values_path, target), namespace):
        table.add_row(ep.variant_id, ep.runtime, ep.url)
    out.print(table)
    out.print(f"Values: {values_path}")


@app.command()
def undeploy(
    release: Annotated[str, typer.Option("--release", help="Helm release name.")] = "optiserve",
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Kubernetes namespace.")] = "default",
) -> None:
    """Remove a release that `optiserve deploy` installed (helm uninstall).

    Example: [bold]optiserve undeploy --release optiserve --namespace ml[/]
    """
    from optiserve.deploy import k8s

    k8s.require_cluster()
    k8s.uninstall(k8s.Target(release=release, namespace=namespace))
    out.print(f"Uninstalled {release} from namespace {namespace}")


def _loadgen_payloads(cfg: ExperimentConfig, spec: Any, samples: int = 8) -> str:
    """OIP requests for the chart's in-cluster load generator: the samples `optiserve bench` sends."""
    import tempfile

    from optiserve.deploy.k8s import loadgen_payloads
    from optiserve.loadtests.runner import write_payloads
    from optiserve.models.resolve import dataset

    inputs, _ = dataset(spec, "eval", samples)
    with tempfile.TemporaryDirectory(prefix="optiserve-payloads.") as tmp:
        path = write_payloads(Path(tmp) / "payloads.jsonl", inputs, spec.inputs[0].name, limit=samples)
        return loadgen_payloads(path.read_text().splitlines())


def _check_plugins(cfg: ExperimentConfig) -> None:
    """Unknown optimizer/runtime/scenario names are config errors, caught before any work."""
    from optiserve.deploy.targets.base import Target
    from optiserve.loadtests.scenarios.base import Scenario
    from optiserve.optimizers.base import Optimizer
    from optiserve.services.runtimes.base import Runtime

    for entry in cfg.optimizers or ():
        Optimizer.get(entry.name)
    for name in cfg.serving.runtimes or ():
        Runtime.get(name)
    Scenario.get(cfg.load.scenario)
    Target.get(cfg.serving.target)


def _existing_plan(cfg: ExperimentConfig, variant_ids: list[str] | None) -> Any:
    from optiserve import pipeline

    spec = pipeline.resolve(cfg)
    _check_plugins(cfg)
    variants = [v for v in pipeline.known_variants(cfg.workdir).values() if v.model.name == spec.name]
    variant_ids = variant_ids or (list(cfg.serving.variants) if cfg.serving.variants else None)
    if variant_ids:
        unknown = sorted(set(variant_ids) - {v.id for v in variants})
        if unknown:
            known = ", ".join(v.id for v in variants) or "(none)"
            raise ConfigError(f"unknown variant {unknown[0]!r} in {cfg.workdir}; known: {known}")
        variants = [v for v in variants if v.id in variant_ids]
    if not variants:
        raise ConfigError(
            f"no variants of {spec.name} in {cfg.workdir}", hint="run `optiserve optimize` first"
        )
    p = pipeline.gate(cfg, pipeline.plan(cfg, spec, variants, {}), pipeline.stored_evaluations(cfg, variants))
    if not p.pairs:
        raise OptiserveError(
            "no variant can be served by an available runtime", hint="see `optiserve doctor`"
        )
    return p


def _in_cluster_result(cfg: ExperimentConfig, p: Any, run_dir: Path, release: str, namespace: str) -> Any:
    """The chart's in-cluster Locust run as a BenchResult: workers' samples read with kubectl."""
    import yaml

    from optiserve import pipeline
    from optiserve.deploy.incluster import collect, started_at
    from optiserve.deploy.k8s import require_cluster
    from optiserve.loadtests.runner import result_from_samples
    from optiserve.types import Endpoint, LoadSpec

    require_cluster()
    samples = run_dir / "samples" / "in-cluster.samples.csv"
    samples.parent.mkdir(parents=True, exist_ok=True)
    with Steps().task(f"Waiting for the in-cluster load test of {release} in {namespace}"):
        variant_id, _ = collect(release, namespace, samples)
    pair = next(((v, rt) for v, rt in p.pairs if v.id == variant_id), None)
    if pair is None:
        raise ConfigError(f"the in-cluster load test targeted {variant_id!r}, which is not in {cfg.workdir}")
    values_path = cfg.workdir / "deploy" / "values.yaml"
    loadgen = (
        (yaml.safe_load(values_path.read_text()) or {}).get("loadgen", {}) if values_path.is_file() else {}
    )
    run_s = float(str(loadgen.get("runTime", "60s")).rstrip("s"))
    load = LoadSpec(
        scenario="in-cluster",
        load_model="closed",
        users=int(loadgen.get("users", 8)),
        duration_s=max(run_s - cfg.load.warmup_s, 1.0),
        warmup_s=cfg.load.warmup_s,
    )
    spec = pipeline.service_spec(cfg, *pair)
    endpoint = Endpoint(service=spec, url=f"kubernetes://{namespace}/{release}", target="kubernetes")
    return result_from_samples(endpoint, load, samples, started_at(samples))


def _check_prices(cfg: ExperimentConfig) -> None:
    """A bad price file fails before any work, not when the report is priced at the end."""
    from optiserve.cost import load_prices

    load_prices(cfg.cost.prices)


def _write_json(path: Path, data: Any) -> None:
    from optiserve.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _print_skipped(skipped: dict[str, str]) -> None:
    for what, why in skipped.items():
        out.print(f"[yellow]skipped[/] {escape(what)}: {escape(why)}")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _fail(message: str, code: int) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


# Typer 0.29 ships its own copy of click: its usage errors are not click's ClickException, and in
# non-standalone mode it turns Ctrl-C into a *returned* 130 instead of raising. Handle both generations.
_USAGE_ERRORS: tuple[type[Exception], ...] = (
    click.ClickException,
    getattr(typer, "TyperException", click.ClickException),
)
_ABORTS: tuple[type[BaseException], ...] = (
    click.exceptions.Abort,
    typer.Abort,
    KeyboardInterrupt,
    Interrupted,
)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="optiserve", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except _USAGE_ERRORS as e:
        e.show()  # type: ignore[attr-defined]
        sys.exit(e.exit_code)  # type: ignore[attr-defined]
    except _ABORTS:
        _fail("interrupted; every server and load generator started by this run was stopped", 130)
    except OptiserveError as e:
        _fail(e.one_line(), e.exit_code)
    except Exception as e:
        if os.environ.get("OPTISERVE_DEBUG"):
            raise
        _fail(f"unexpected {type(e).__name__}: {e} (a bug; set OPTISERVE_DEBUG=1 for the traceback)", 1)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
