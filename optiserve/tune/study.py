"""The Optuna study behind `optiserve tune`: grid (GridSampler), random (RandomSampler) or Bayesian (TPE),
stored in ``<workdir>/tune/studies.db`` (SQLite) so an interrupted search resumes where it stopped.

The objective is the cost per 1M inferences of a feasible trial (minimised). An infeasible trial is
given a penalty far above any cost, growing with how far it misses the SLO, so TPE learns which way the
SLO lies; a pruned trial is told to Optuna as pruned. A configuration the sampler proposes again is not
measured again: it gets its first measurement's value and does not count as a trial.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiserve.cost import format_usd
from optiserve.progress import Steps

from .space import SearchSpace
from .trial import TrialOutcome, run_trial

if TYPE_CHECKING:
    import optuna

    from optiserve.config import ExperimentConfig
    from optiserve.cost import PriceTable
    from optiserve.pipeline import Plan
    from optiserve.types import BenchResult, Evaluation

PENALTY = 1e6
"""Objective of an infeasible trial: PENALTY × how many times over the SLO its p99 was (at least 1)."""
MAX_REPEATS = 100
"""Proposals of already-measured configurations tolerated in a row before the search counts as converged."""


@dataclass
class StudyResult:
    name: str
    strategy: str
    storage: Path
    outcomes: list[TrialOutcome]
    """Every measured trial of the study, this session's and earlier ones', in trial order."""
    grid_size: int
    planned: int
    measured_now: int
    converged: bool


def default_trials(config: ExperimentConfig, space: SearchSpace) -> int:
    if config.tune.trials is not None:
        return min(config.tune.trials, space.grid_size)
    if config.tune.strategy == "grid":
        return space.grid_size
    return min(space.grid_size, max(4, math.ceil(space.grid_size / 3)))


def study_name(config: ExperimentConfig, space: SearchSpace, model: str) -> str:
    """Named after what decides the result, so a changed search never resumes an unrelated study."""
    if config.tune.study:
        return config.tune.study
    t = config.tune
    decisive = {
        "space": space.choices(),
        "slo_ms": config.load.slo_ms,
        "offered_rps": config.cost.offered_rps,
        "instance": config.cost.instance,
        "rates": [t.min_rate, t.max_rate, t.steps, t.duration_s, t.warmup_s],
        "target": config.serving.target,
        "seed": t.seed,
    }
    digest = hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{model}-{t.strategy}-{digest}"


def sampler(config: ExperimentConfig, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    seed = config.tune.seed
    if config.tune.strategy == "grid":
        return grid_sampler(space.choices(), seed=seed)
    if config.tune.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(4, max(1, default_trials(config, space) // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)


def grid_sampler(choices: dict[str, list[Any]], seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's, without its ``study.stop()`` once the grid is covered: that works only inside
        ``study.optimize``, and this loop (ask and tell) stops at the planned trial count itself."""

        def after_trial(self, *args: Any, **kwargs: Any) -> None:
            return None

    return GridSampler(choices, seed=seed)


def objective(outcome: TrialOutcome) -> float:
    if outcome.feasible and outcome.usd_per_million is not None:
        return outcome.usd_per_million
    miss = outcome.miss_ratio if outcome.miss_ratio is not None else math.inf
    return PENALTY * (max(miss, 1.0) if math.isfinite(miss) else 100.0)


def run_study(
    config: ExperimentConfig,
    plan: Plan,
    space: SearchSpace,
    out_dir: Path,
    *,
    prices: PriceTable,
    instance: str,
    evaluations: dict[tuple[str, str], Evaluation],
    steps: Steps,
) -> StudyResult:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = config.workdir / "tune" / "studies.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    name = study_name(config, space, plan.spec.name)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{db.resolve()}",
        sampler=sampler(config, space),
        direction="minimize",
        load_if_exists=True,
    )
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)  # cut off in an earlier session: measured again
    planned = default_trials(config, space)
    done = _measured(study)
    if done:
        steps.note(f"Resuming study {name}: {len(done)} of {planned} trials measured already ({db})")
    by_params = {_key(o.params): o for o in done}
    incumbents = _incumbents(done)
    durations: list[float] = []
    repeats = 0
    measured_now = 0
    with steps.task(f"Tuning {plan.spec.name} ({config.tune.strategy})", total=planned) as advance:
        advance(len(done))
        while len(done) < planned and repeats < MAX_REPEATS:
            trial = study.ask()
            candidate = space.suggest(trial)
            earlier = by_params.get(_key(candidate.params()))
            if earlier is not None:  # proposed again: its measurement stands
                repeats += 1
                _tell(study, trial, earlier)
                continue
            repeats = 0
            n = len(done) + 1
            eta = _eta(durations, planned - len(done))
            advance(0, description=_headline(n, planned, done, candidate.label(), eta))
            started = time.monotonic()
            trial_dir = out_dir / "trials" / f"{trial.number:03d}"
            outcome = run_trial(
                config,
                plan,
                candidate,
                trial_dir,
                prices=prices,
                instance=instance,
                incumbent_rps=_scaled(incumbents.get(candidate.deployment.key), candidate.replicas),
                evaluation=evaluations.get((candidate.deployment.variant_id, candidate.deployment.runtime)),
                on_level=_level_note(advance, n, planned, done, candidate.label(), eta),
            )
            durations.append(time.monotonic() - started)
            _tell(study, trial, outcome)
            done.append(outcome)
            by_params[_key(outcome.params)] = outcome
            if outcome.trusted and outcome.capacity_rps:
                key = candidate.deployment.key
                incumbents[key] = max(incumbents.get(key, 0.0), outcome.capacity_rps / candidate.replicas)
            measured_now += 1
            advance(1, description=_headline(n, planned, done, None, _eta(durations, planned - len(done))))
    return StudyResult(
        name=name,
        strategy=config.tune.strategy,
        storage=db,
        outcomes=done,
        grid_size=space.grid_size,
        planned=planned,
        measured_now=measured_now,
        converged=repeats >= MAX_REPEATS,
    )


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("outcome", outcome.to_attrs())
    if outcome.pruned is not None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, objective(outcome))


def _measured(study: optuna.Study) -> list[TrialOutcome]:
    """The study's measured trials (first measurement of each configuration), in trial order."""
    from optuna.trial import TrialState

    seen: dict[str, TrialOutcome] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        attrs = t.user_attrs.get("outcome")
        if attrs is not None:
            outcome = TrialOutcome.from_attrs(attrs)
            seen.setdefault(_key(outcome.params), outcome)
    return list(seen.values())


def _incumbents(outcomes: list[TrialOutcome]) -> dict[str, float]:
    """Per deployment, the best trusted capacity per replica measured so far."""
    best: dict[str, float] = {}
    for o in outcomes:
        if o.trusted and o.capacity_rps:
            key = o.params["deployment"]
            best[key] = max(best.get(key, 0.0), o.capacity_rps / o.params.get("replicas", 1))
    return best


def _scaled(per_replica_rps: float | None, replicas: int) -> float | None:
    """The capacity ``replicas`` replicas must reach to cost no more than the incumbent (cost is priced
    per replica)."""
    return None if per_replica_rps is None else per_replica_rps * replicas


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _eta(durations: list[float], left: int) -> str:
    if not durations:
        return "time left unknown"
    seconds = sum(durations) / len(durations) * left
    return f"~{seconds / 60:.0f} min left" if seconds >= 90 else f"~{seconds:.0f} s left"


def _best(done: list[TrialOutcome]) -> str:
    trusted = [o for o in done if o.trusted and o.usd_per_million is not None]
    if not trusted:
        return "no configuration meets the SLO yet"
    best = min(trusted, key=lambda o: o.usd_per_million or math.inf)
    return f"best {format_usd(best.usd_per_million or 0)}/1M ({best.label})"


def _headline(n: int, planned: int, done: list[TrialOutcome], label: str | None, eta: str) -> str:
    now = f" · now {label}" if label else ""
    return f"trial {min(n, planned)} of {planned} · {_best(done)}{now} · {eta}"


def _level_note(
    advance: Callable[..., None], n: int, planned: int, done: list[TrialOutcome], label: str, eta: str
) -> Callable[[BenchResult], None]:
    def note(result: BenchResult) -> None:
        p99 = f"p99 {result.latency_ms.p99:.1f} ms" if result.latency_ms else "no answers"
        level = f"{result.load.rate_rps:g} req/s → {p99}"
        advance(0, description=f"{_headline(n, planned, done, label, eta)} · {level}")

    return note
