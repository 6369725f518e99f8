"""`optiserve tune`: the search space and its one-line refusals, a real search (grid) on the tiny ONNX model
served by real servers, its outputs (recommended config, Helm values `deploy --values` renders), resuming
a study, pruning a hopeless trial on its first level, and an SLO nothing can meet."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from optiserve import pipeline
from optiserve.config import ExperimentConfig, cpu_split, load_config, with_overrides
from optiserve.cost import load_prices, usd_per_million
from optiserve.errors import ConfigError
from optiserve.tune.outcome import closest, pareto, recommended, report_row
from optiserve.tune.space import build_space
from optiserve.tune.trial import TrialOutcome, run_trial
from optiserve.types import Variant
from tests.conftest import error_lines, run_cli

TUNE = {
    "strategy": "grid",
    "duration_s": 3,
    "warmup_s": 1,
    "steps": 2,
    "min_rate": 20,
    "max_rate": 400,
    "remeasure": 0,
    "space": {"max_batch_size": [2, 8], "max_latency_ms": [1000]},
}


def plan_for(onnx_source: Variant, workdir: Path, config: ExperimentConfig) -> pipeline.Plan:
    return pipeline.plan(config, onnx_source.model, [onnx_source], {})


def first_trial(
    config: ExperimentConfig, source: Variant, workdir: Path, folder: Path, *, incumbent_rps: float | None
) -> TrialOutcome:
    """The space's first candidate, measured as a study would measure it."""
    from optiserve.cost import load_prices

    p = plan_for(source, workdir, config)
    candidate = build_space(config, p, server_cpus=1).all()[0]
    return run_trial(
        config,
        p,
        candidate,
        folder,
        prices=load_prices(None),
        instance="c6i.large",
        incumbent_rps=incumbent_rps,
        evaluation=None,
    )


def config_for(workdir: Path, **tune: object) -> ExperimentConfig:
    return with_overrides(ExperimentConfig(), {"workdir": str(workdir), "tune": {**TUNE, **tune}})


def test_the_space_is_every_combination(onnx_source: Variant, variants_workdir: Path) -> None:
    config = config_for(variants_workdir)
    space = build_space(config, plan_for(onnx_source, variants_workdir, config), server_cpus=1)
    assert space.grid_size == 2 == len(space.all())
    assert [c.max_batch_size for c in space.all()] == [2, 8]
    assert "2 configurations" in space.describe()


def test_replicas_multiply_the_space_and_set_serving_replicas(
    onnx_source: Variant, variants_workdir: Path
) -> None:
    config = config_for(variants_workdir, space={**TUNE["space"], "replicas": [2, 1]})  # type: ignore[dict-item]
    space = build_space(config, plan_for(onnx_source, variants_workdir, config), server_cpus=1)
    assert space.grid_size == 4 and sorted({c.replicas for c in space.all()}) == [1, 2]
    two = next(c for c in space.all() if c.replicas == 2)
    assert two.overrides()["serving.replicas"] == 2 and "×2 replicas" in two.label()
    assert space.from_params(two.params()) == two


@pytest.mark.slow
def test_a_trial_measures_its_replicas_together_and_prices_each(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    config = config_for(variants_workdir, space={**TUNE["space"], "replicas": [2]})  # type: ignore[dict-item]
    outcome = first_trial(config, onnx_source, variants_workdir, tmp_path / "trial", incumbent_rps=None)
    assert outcome.feasible, outcome.missed
    assert outcome.params["replicas"] == 2 and outcome.replicas == 2
    server, _ = cpu_split(sorted(os.sched_getaffinity(0)), None, None)
    # on 2 CPUs the server gets 1: the report must say the replicas shared it
    said = f"2 replicas shared {len(server)} CPU(s) (they need 2)" if len(server) < 2 else None
    assert outcome.shared_cpus == said
    if said:  # ... in the report's note on that trial
        assert said in report_row(outcome, on_front=False, best=None)[-1]
    levels = [json.loads(p.read_text()) for p in (tmp_path / "trial" / "bench").glob("*.json")]
    assert levels and all(level["endpoint"]["service"]["replicas"] == 2 for level in levels)
    # priced as two instances for what the two served together
    assert outcome.usd_per_million == pytest.approx(
        usd_per_million(load_prices(None).get("c6i.large").usd_per_hour, 2, outcome.capacity_rps), rel=1e-6
    )


@pytest.mark.parametrize(
    ("tune", "key"),
    [
        ({"space": {"variants": ["nope"]}}, "tune.space.variants: unknown variant 'nope'"),
        ({"space": {"runtimes": ["openvino"]}}, "tune.space.runtimes"),
        (
            {"space": {"intra_op_threads": [4]}},
            "tune.space.intra_op_threads: 4 threads, but the servers get 1",
        ),
        ({"space": {"replicas": [0, 2]}}, "tune.space.replicas: 0 is below the least allowed value, 1"),
        ({"space": {"max_batch_size": [1, 4]}}, "tune.space.max_batch_size: 1 is below"),
        ({"min_rate": 500}, "tune.min_rate (500) must be below tune.max_rate"),
    ],
)
def test_a_contradictory_space_is_one_line_naming_the_key(
    onnx_source: Variant, variants_workdir: Path, tune: dict[str, object], key: str
) -> None:
    config = config_for(variants_workdir, **tune)
    with pytest.raises(ConfigError) as e:
        build_space(config, plan_for(onnx_source, variants_workdir, config), server_cpus=1)
    assert key in e.value.one_line() and "\n" not in e.value.one_line()


def test_an_empty_space_is_refused_when_the_config_is_read(tmp_path: Path) -> None:
    path = tmp_path / "tune.yaml"
    path.write_text("tune:\n  space:\n    max_batch_size: []\n")
    with pytest.raises(ConfigError, match=r"tune\.space\.max_batch_size"):
        load_config(path)


def cli_tune(tmp_path: Path, mlp_onnx: Path, *extra: object, slo: float = 250.0) -> tuple[object, Path]:
    config = tmp_path / "tune.yaml"
    config.write_text(
        yaml.safe_dump({"model": {"ref": str(mlp_onnx)}, "workdir": str(tmp_path / "w"), "tune": TUNE})
    )
    done = run_cli("tune", config, "--slo", slo, *extra, cwd=tmp_path, timeout=600)
    return done, tmp_path / "w"


@pytest.fixture(scope="module")
def tuned(mlp_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path]:
    tmp = tmp_path_factory.mktemp("tune")
    built = run_cli("optimize", "--model", mlp_onnx, "--workdir", tmp / "w", "-o", "onnx-export", cwd=tmp)
    assert built.returncode == 0, built.stderr
    done, workdir = cli_tune(tmp, mlp_onnx)
    return done, workdir, tmp


@pytest.mark.slow
def test_a_grid_search_measures_every_configuration_and_recommends_one(
    tuned: tuple[object, Path, Path],
) -> None:
    done, workdir, tmp = tuned
    assert done.returncode == 0, done.stdout + done.stderr  # type: ignore[attr-defined]
    (out,) = workdir.glob("results/*-tune")
    report = json.loads((out / "tune.json").read_text())
    assert report["grid_size"] == 2 and len(report["trials"]) == 2
    assert sorted(t["params"]["max_batch_size"] for t in report["trials"]) == [2, 8]
    best = report["recommended"]
    assert best["feasible"] and best["usd_per_million"] > 0 and best["capacity_rps"] >= 20
    assert any(t["pareto"] for t in report["trials"])
    assert "Recommended: **" in (out / "tune.md").read_text()
    assert "<svg" in (out / "tune.html").read_text()
    # the recommended config is a valid experiment config with the chosen serving settings
    chosen = load_config(out / "recommended.yaml")
    assert chosen.serving.batching.max_batch_size == best["params"]["max_batch_size"]
    assert chosen.serving.runtimes == ("onnxruntime",) and chosen.load.slo_ms == 250
    assert chosen.serving.variants == (best["params"]["deployment"].split("@")[0],)
    # ... which the other commands take alone: deploy renders that one variant with those settings
    as_config = run_cli("deploy", out / "recommended.yaml", "--render", tmp / "from-config", cwd=tmp)
    assert as_config.returncode == 0, as_config.stderr
    deployments = [
        d
        for p in (tmp / "from-config").glob("*.yaml")
        if (d := yaml.safe_load(p.read_text()))["kind"] == "Deployment"
    ]
    assert len(deployments) == 1, [d["metadata"]["name"] for d in deployments]
    # ... and its Helm values are what `optiserve deploy --values` installs (rendered here: no cluster)
    values = yaml.safe_load((out / "recommended-values.yaml").read_text())
    assert values["variants"][0]["replicas"] == 1
    rendered = run_cli(
        "deploy",
        "--values",
        out / "recommended-values.yaml",
        "--workdir",
        workdir,
        "--render",
        tmp / "m",
        cwd=tmp,
    )
    assert rendered.returncode == 0, rendered.stderr
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in (tmp / "m").glob("*.yaml")}
    assert {"Deployment", "Service"} <= kinds


@pytest.mark.slow
def test_a_finished_study_resumes_without_measuring_again(
    mlp_onnx: Path, tuned: tuple[object, Path, Path]
) -> None:
    _, workdir, tmp = tuned
    started = time.monotonic()
    again, _ = cli_tune(tmp, mlp_onnx)
    assert again.returncode == 0, again.stderr  # type: ignore[attr-defined]
    assert "Resuming study" in again.stderr and "2 of 2 trials measured already" in again.stderr  # type: ignore[attr-defined]
    assert time.monotonic() - started < 60  # nothing was served
    newest = sorted(workdir.glob("results/*-tune"))[-1]
    assert not (newest / "trials").exists()


@pytest.mark.slow
def test_an_slo_nothing_meets_lists_the_closest_and_exits_9(mlp_onnx: Path, tmp_path: Path) -> None:
    built = run_cli(
        "optimize", "--model", mlp_onnx, "--workdir", tmp_path / "w", "-o", "onnx-export", cwd=tmp_path
    )
    assert built.returncode == 0, built.stderr
    done, _ = cli_tune(tmp_path, mlp_onnx, "--trials", 1, slo=0.01)
    assert done.returncode == 9, done.stdout + done.stderr  # type: ignore[attr-defined]
    (line,) = error_lines(done.stderr)  # type: ignore[attr-defined]
    assert "no configuration of the 1 measured met p99 <= 0.01 ms; closest:" in line
    assert "over the 0.01 ms SLO" in done.stdout  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_trial_that_cannot_beat_its_deployment_s_best_is_pruned_on_its_first_level(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    # An SLO no HTTP request meets here, and an incumbent at a rate the server handles easily: the
    # first level (at 90% of the incumbent's capacity) misses, so nothing after it may run.
    config = with_overrides(config_for(variants_workdir), {"load.slo_ms": 0.05})
    outcome = first_trial(config, onnx_source, variants_workdir, tmp_path / "trial", incumbent_rps=100.0)
    assert outcome.pruned is not None and "cannot be cheaper" in outcome.pruned
    assert outcome.levels == 1 and not outcome.feasible
    assert len(list((tmp_path / "trial" / "bench").glob("*.json"))) == 1


def outcome(label: str, **fields: object) -> TrialOutcome:
    return TrialOutcome(label=label, params={"deployment": label}, run_dir="", **fields)  # type: ignore[arg-type]


def test_the_recommendation_is_the_cheapest_trusted_trial_and_the_front_keeps_trade_offs() -> None:
    cheap = outcome(
        "cheap", feasible=True, usd_per_million=1.0, p99_ms=40.0, accuracy=0.70, capacity_rps=100.0
    )
    fast = outcome("fast", feasible=True, usd_per_million=2.0, p99_ms=10.0, accuracy=0.70, capacity_rps=50.0)
    worse = outcome(
        "worse", feasible=True, usd_per_million=3.0, p99_ms=50.0, accuracy=0.70, capacity_rps=30.0
    )
    noisy = outcome("noisy", feasible=True, usd_per_million=0.5, p99_ms=5.0, accuracy=0.9, noisy=True)
    missed = outcome("missed", p99_ms=80.0, miss_ratio=1.6, missed="p99 80.0 ms at 5 req/s: +30.0 ms over")
    pruned = outcome("pruned", pruned="cannot be cheaper")
    trials = [cheap, fast, worse, noisy, missed, pruned]
    assert recommended(trials) is cheap  # the noisy one is cheaper but not trusted
    assert pareto(trials) == [True, True, False, False, False, False]
    assert closest(trials) == ["missed: p99 80.0 ms at 5 req/s: +30.0 ms over"]
    assert recommended([missed, pruned]) is None


def test_deploy_values_that_are_not_chart_values_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "values.yaml"
    bad.write_text("just: a mapping\n")
    done = run_cli(
        "deploy", "--values", bad, "--workdir", tmp_path / "w", "--render", tmp_path / "m", cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr)
    assert "expected chart values with a non-empty `variants:` list" in line
    both = run_cli("deploy", "--values", bad, "--weights", "a=100", "--render", tmp_path / "m", cwd=tmp_path)
    assert both.returncode == 2 and "drop --weights" in error_lines(both.stderr)[0], both.stderr


@pytest.mark.slow
def test_a_configuration_whose_server_fails_is_recorded_and_the_search_goes_on(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    import shutil

    work = tmp_path / "w"
    shutil.copytree(variants_workdir / "variants" / onnx_source.id, work / "variants" / onnx_source.id)
    model = work / "variants" / onnx_source.id / onnx_source.artifacts["model"].path
    model.write_bytes(model.read_bytes()[:-8] + b"tampered")  # the server refuses it by checksum
    trial = first_trial(config_for(work), onnx_source, work, tmp_path / "trial", incumbent_rps=None)
    assert not trial.feasible and trial.missed is not None and trial.missed.startswith("failed: ")
    assert "checksum" in trial.missed or "sha256" in trial.missed, trial.missed


def test_a_search_whose_verdicts_contradict_each_other_is_noisy() -> None:
    from optiserve.tune.trial import contradicts_itself
    from tests.test_cost import bench_result

    def level(rate: float, p99: float) -> object:
        return bench_result("m.x", users=8, rps=rate, p99=p99, load_model="open")

    monotone = [level(40, 10), level(80, 20), level(160, 70), level(113, 45)]
    assert not contradicts_itself(monotone, 50.0)  # type: ignore[arg-type]
    flipped = [level(40, 10), level(80, 60), level(160, 30)]  # 160 passed although 80 failed
    assert contradicts_itself(flipped, 50.0)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("space", "said"),
    [
        ({"intra_op_threads": [512]}, "error: tune.space.intra_op_threads: 512 threads"),
        ({"variants": ["mlp.onnx.nope"]}, "error: tune.space.variants: unknown variant 'mlp.onnx.nope'"),
    ],
)
def test_the_cli_refuses_a_bad_space_with_one_line_naming_the_key_and_exit_2(
    mlp_onnx: Path, tuned: tuple[object, Path, Path], space: dict[str, object], said: str
) -> None:
    _, workdir, tmp = tuned
    config = tmp / "bad.yaml"
    config.write_text(
        yaml.safe_dump({"model": {"ref": str(mlp_onnx)}, "workdir": str(workdir), "tune": {"space": space}})
    )
    done = run_cli("tune", config, cwd=tmp)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith(said), line
