"""One tuning trial: a candidate served on the configured target and measured with the SLO search (the
highest open-loop rate whose p99 meets the SLO with no errors and a generator that kept up), through
:func:`optiserve.pipeline.bench`: the same targets, pinning, scenarios and integrity checks as `bench`.

Pruning: a candidate of a deployment (variant × runtime) that already has a measured capacity starts
its search at 90% of that capacity (per replica, times the candidate's replicas: each replica is paid
for). If it misses the SLO there it cannot be cheaper than its own deployment's incumbent (same
accuracy, same price per replica, less throughput per replica), so it stops after that first level.
A trial whose verdicts contradict each other (a higher rate passed where a lower one failed) is measured
again (``tune.remeasure`` times) before it is marked noisy; a noisy trial is shown but never recommended.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiserve.config import ExperimentConfig, with_overrides
from optiserve.errors import LoadTestError, ServingError
from optiserve.progress import Steps

if TYPE_CHECKING:
    from optiserve.cost import PriceTable
    from optiserve.pipeline import Plan
    from optiserve.types import BenchResult, Evaluation

    from .space import Candidate

PRUNE_FRACTION = 0.9
"""A candidate must reach this share of its deployment's best capacity on its first level to go on."""


class Pruned(Exception):
    """Raised from the bench's level hook: the first level showed the candidate cannot win."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class TrialOutcome:
    """What one trial measured, as stored with the Optuna trial (``to_attrs``) and reported."""

    label: str
    params: dict[str, Any]
    run_dir: str
    feasible: bool = False
    capacity_rps: float | None = None
    """The highest rate measured whose p99 met the SLO with no errors."""
    p99_ms: float | None = None
    """At that rate; for an infeasible trial, at its lowest rate."""
    usd_per_million: float | None = None
    replicas: int | None = None
    accuracy: float | None = None
    accuracy_metric: str | None = None
    miss_ratio: float | None = None
    """Infeasible: p99 at the lowest rate ÷ SLO (at least 1; inf when requests failed there)."""
    missed: str | None = None
    """Infeasible: why its lowest rate did not pass, in words."""
    levels: int = 0
    attempts: int = 1
    noisy: bool = False
    pruned: str | None = None
    flags: list[str] = field(default_factory=list)
    shared_cpus: str | None = None
    """Replicas on one machine that had fewer CPUs than they need, so shared them (shown in the report)."""

    def to_attrs(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TrialOutcome:
        known = {k: v for k, v in attrs.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def trusted(self) -> bool:
        return self.feasible and not self.noisy and self.pruned is None


def trial_config(config: ExperimentConfig, candidate: Candidate, start_rate: float) -> ExperimentConfig:
    """The experiment config of one trial: the candidate's serving settings, the SLO search from
    ``start_rate``."""
    t = config.tune
    return with_overrides(
        config,
        {
            **candidate.overrides(),
            "load.scenario": "slo-search",
            "load.scenario_options": {
                "slo_ms": config.load.slo_ms,
                "min_rate": start_rate,
                "max_rate": max(t.max_rate, start_rate * 2),
                "steps": t.steps,
                "duration_s": t.duration_s,
                "warmup_s": t.warmup_s,
            },
        },
    )


def run_trial(
    config: ExperimentConfig,
    plan: Plan,
    candidate: Candidate,
    trial_dir: Path,
    *,
    prices: PriceTable,
    instance: str,
    incumbent_rps: float | None,
    evaluation: Evaluation | None,
    on_level: Callable[[BenchResult], None] | None = None,
) -> TrialOutcome:
    """Serve and measure ``candidate`` (again while its verdicts contradict each other, up to
    tune.remeasure)."""

    def measure(folder: Path) -> TrialOutcome:
        return _measure_once(config, plan, candidate, folder, prices, instance, incumbent_rps, on_level)

    outcome = measure(trial_dir)
    while outcome.noisy and outcome.attempts <= config.tune.remeasure:
        attempts = outcome.attempts + 1
        outcome = measure(trial_dir.with_name(f"{trial_dir.name}-again{attempts - 1}"))
        outcome.attempts = attempts
    if evaluation is not None:
        outcome.accuracy, outcome.accuracy_metric = evaluation.value, evaluation.metric
    return outcome


def _measure_once(
    config: ExperimentConfig,
    plan: Plan,
    candidate: Candidate,
    trial_dir: Path,
    prices: PriceTable,
    instance: str,
    incumbent_rps: float | None,
    on_level: Callable[[BenchResult], None] | None,
) -> TrialOutcome:
    from optiserve import pipeline
    from optiserve.cost import estimate_costs
    from optiserve.loadtests.scenarios.slo_search import meets_slo

    slo = config.load.slo_ms
    probe = max(config.tune.min_rate, PRUNE_FRACTION * incumbent_rps) if incumbent_rps else None
    cfg = trial_config(config, candidate, probe or config.tune.min_rate)
    variant = plan.variants[[v.id for v in plan.variants].index(candidate.deployment.variant_id)]
    one = type(plan)(spec=plan.spec, variants=[variant], pairs=[(variant, candidate.deployment.runtime)])
    outcome = TrialOutcome(label=candidate.label(), params=candidate.params(), run_dir=str(trial_dir))
    seen: list[BenchResult] = []

    def hook(result: BenchResult) -> None:
        seen.append(result)
        if on_level is not None:
            on_level(result)
        if probe is not None and len(seen) == 1 and not meets_slo(result, slo):
            raise Pruned(
                f"missed the SLO at {probe:.1f} req/s, 90% of this deployment's best capacity "
                f"({incumbent_rps:.1f} req/s for {candidate.replicas} replica(s)): it cannot be cheaper"
            )

    trial_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = pipeline.bench(cfg, one, trial_dir, Steps(enabled=False), on_level=hook)
    except Pruned as e:
        outcome.pruned = e.reason
        results = seen
    except (ServingError, LoadTestError) as e:  # this configuration failed; the search goes on
        outcome.levels = len(seen)
        outcome.missed, outcome.miss_ratio = f"failed: {summary(e.one_line())[:400]}", math.inf
        return outcome
    outcome.levels = len(results)
    outcome.flags = sorted({f for r in results for f in r.integrity.flags})
    outcome.shared_cpus = shared_cpus(cfg)
    # Passing as the SLO search judges it: also no generator saturation and no late sends.
    passing = [r for r in results if meets_slo(r, slo)]
    best = max(passing, key=lambda r: r.throughput_rps, default=None)
    if best is None:
        first = min(results, key=lambda r: r.load.rate_rps or 0.0) if results else None
        if first is not None:
            outcome.missed, outcome.miss_ratio = why_missed(first, slo)
            outcome.p99_ms = first.latency_ms.p99 if first.latency_ms else None
        return outcome
    costs = estimate_costs(passing, prices, instance, slo, config.cost.offered_rps)
    cost = next((c for c in costs if c.basis == "offered-load"), costs[0])
    outcome.feasible = True
    outcome.capacity_rps = best.throughput_rps
    outcome.p99_ms = best.latency_ms.p99 if best.latency_ms else None
    outcome.usd_per_million = cost.usd_per_million
    outcome.replicas = cost.replicas
    outcome.noisy = contradicts_itself(results, slo)
    return outcome


def shared_cpus(config: ExperimentConfig) -> str | None:
    """Said when the replicas of a trial on one machine had fewer CPUs than they ask for (replicas ×
    threads), so they shared them: what such a trial measured is not N replicas of their own."""
    import os

    from optiserve.config import cpu_split

    if config.serving.target not in ("local", "docker"):
        return None
    server, _ = cpu_split(sorted(os.sched_getaffinity(0)), config.serving.cpus, config.load.generator_cpus)
    have = len(server) if server else os.cpu_count() or 1
    want = config.serving.replicas * config.serving.threads.intra_op
    if config.serving.replicas < 2 or want <= have:
        return None
    return f"{config.serving.replicas} replicas shared {have} CPU(s) (they need {want})"


def contradicts_itself(results: list[BenchResult], slo_ms: float) -> bool:
    """Whether a higher rate passed where a lower one failed: the verdicts near the capacity are then
    noise, and the capacity found cannot be trusted. (A level's own "unstable" flag is not used: at the
    few seconds a search level lasts, a p99 over each third of an open-loop level always varies.)"""
    from optiserve.loadtests.scenarios.slo_search import meets_slo

    verdicts = sorted(((r.load.rate_rps or 0.0), meets_slo(r, slo_ms)) for r in results)
    failed_below = False
    for _, passed in verdicts:
        if passed and failed_below:
            return True
        failed_below = failed_below or not passed
    return False


def why_missed(level: BenchResult, slo_ms: float) -> tuple[str, float]:
    """(why ``level`` did not pass, how far it is from passing as a ratio ≥ 1 for ranking)."""
    rate = f"{level.load.rate_rps:g} req/s"
    if level.n_errors:
        return f"{level.n_errors} of {level.n_requests} requests failed at {rate}", math.inf
    if level.latency_ms is None:
        return f"no answer at {rate}", math.inf
    p99 = level.latency_ms.p99
    if p99 > slo_ms:
        return f"p99 {p99:.1f} ms at {rate}: {p99 - slo_ms:+.1f} ms over the {slo_ms:g} ms SLO", p99 / slo_ms
    untrusted = "; ".join(level.integrity.flags) or "not trusted"
    return f"p99 {p99:.1f} ms at {rate} but the measurement is not trusted ({untrusted})", 1.0


def summary(message: str) -> str:
    """A failure's first line, and, when it quotes a log, the exception the log ends with."""
    import re

    lines = [line.strip() for line in message.splitlines() if line.strip()]
    raised = [line for line in lines[1:] if re.match(r"^[\w.]*(Error|Exception)\b:", line)]
    return f"{lines[0]} … {raised[-1]}" if raised else (lines[0] if lines else message)
