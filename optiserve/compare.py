"""A/B comparison of two served variants (or one variant on two runtimes) with a verdict.

Both servers run side by side (pinned to the same server CPUs; the idle one costs nothing) and the
same load level is applied to each in turn, ``repeats`` times, alternating the order (A B, B A, A B,
...) so that a slow drift of the machine does not favour either. Each repeat gives one paired
observation per metric; the difference is the geometric mean of the paired ratios B/A, minus 1,
with a 95% t-interval computed over the repeats on the ratios' logarithms. Latencies and throughputs
differ by factors, so the log scale is the one where repeats spread evenly: a 2x gain and a 2x loss
are symmetric, swapping A and B mirrors the result, and one repeat at 2.8x next to one at 1.5x does
not widen the interval past zero as it does for B/A − 1 (seen in CI: ONNX Runtime vs torch-eager,
p50 ratios 1.55, 2.27, 2.78 over three repeats, "no significant difference" on the linear scale).
Repeats, not requests, are the unit: two runs of the same server differ by more than their
request-level bootstrap intervals admit, which is how single-run comparisons produce false winners.

A metric's verdict names a winner only when its interval excludes zero **and** the difference is at
least ``MIN_EFFECT`` (3%); the overall verdict is p50's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from optiserve.errors import ConfigError
from optiserve.types import BenchResult, Frozen, Variant

if TYPE_CHECKING:
    from pathlib import Path

    from optiserve.config import ExperimentConfig
    from optiserve.progress import Steps

MIN_EFFECT = 0.03
Verdict = Literal["A better", "B better", "no significant difference"]


class MetricComparison(Frozen):
    metric: Literal["p50_ms", "p99_ms", "throughput_rps"]
    a: float
    """Mean over repeats."""
    b: float
    relative_diff: float
    """Geometric mean of the paired B/A, minus 1."""
    ci_low: float
    ci_high: float
    verdict: Verdict


class Comparison(Frozen):
    a: str
    """``variant@runtime``"""
    b: str
    repeats: int
    load: str
    metrics: tuple[MetricComparison, ...]
    verdict: Verdict
    results: tuple[BenchResult, ...] = Field(default=(), repr=False)


@dataclass(frozen=True)
class Side:
    variant_id: str
    runtime: str

    @property
    def label(self) -> str:
        return f"{self.variant_id}@{self.runtime}"


def metric_value(result: BenchResult, metric: str) -> float:
    if metric == "throughput_rps":
        return result.throughput_rps
    if result.latency_ms is None:
        return math.inf
    return float(result.latency_ms.p50 if metric == "p50_ms" else result.latency_ms.p99)


def compare_metric(metric: str, a: list[float], b: list[float]) -> MetricComparison:
    """Paired ratios B/A with a 95% t-interval (n − 1 degrees of freedom) on their logarithms.

    A pair with a zero side (no successful request) has no logarithm: those metrics fall back to the
    paired differences B/A − 1 on the linear scale (all-failed B against a serving A is still a clear
    result); an infinite side (no latency at all) leaves the interval unbounded and no side wins.
    """
    from scipy import stats

    n = len(a)
    if n != len(b) or n < 2:
        raise ValueError("need at least two paired repeats")
    t = float(stats.t.ppf(0.975, n - 1))
    if all(0 < v < math.inf for v in (*a, *b)):
        mean, half = _mean_and_half_width([math.log(bi / ai) for ai, bi in zip(a, b, strict=True)], t)
        relative, low, high = math.expm1(mean), math.expm1(mean - half), math.expm1(mean + half)
    else:
        diffs = [bi / ai - 1.0 if 0 < ai < math.inf else math.inf for ai, bi in zip(a, b, strict=True)]
        relative, half = _mean_and_half_width(diffs, t)
        low, high = (relative - half, relative + half) if math.isfinite(half) else (-math.inf, math.inf)
    lower_is_better = metric != "throughput_rps"
    verdict: Verdict = "no significant difference"
    if (low > 0 or high < 0) and abs(relative) >= MIN_EFFECT:
        b_is_lower = high < 0
        verdict = "B better" if b_is_lower == lower_is_better else "A better"
    return MetricComparison(
        metric=metric,  # type: ignore[arg-type]
        a=sum(a) / n,
        b=sum(b) / n,
        relative_diff=relative,
        ci_low=low,
        ci_high=high,
        verdict=verdict,
    )


def _mean_and_half_width(values: list[float], t: float) -> tuple[float, float]:
    """The mean and the half-width ``t · sd / √n`` (infinite when a value is not finite)."""
    n = len(values)
    mean = sum(values) / n
    if not all(map(math.isfinite, values)):
        return mean, math.inf
    return mean, t * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def summarize(a: Side, b: Side, pairs: list[tuple[BenchResult, BenchResult]]) -> Comparison:
    metrics = tuple(
        compare_metric(m, [metric_value(x, m) for x, _ in pairs], [metric_value(y, m) for _, y in pairs])
        for m in ("p50_ms", "p99_ms", "throughput_rps")
    )
    load = pairs[0][0].load
    shape = (
        f"{load.rate_rps:g} req/s open loop"
        if load.load_model == "open"
        else f"{load.users} users closed loop"
    )
    return Comparison(
        a=a.label,
        b=b.label,
        repeats=len(pairs),
        load=f"{shape}, {load.duration_s:g} s per run",
        metrics=metrics,
        verdict=metrics[0].verdict,
        results=tuple(r for pair in pairs for r in pair),
    )


def render_markdown(c: Comparison) -> str:
    lines = [
        f"# A/B: A = `{c.a}`, B = `{c.b}`",
        "",
        f"{c.repeats} interleaved repeats of {c.load}. Differences are B relative to A (geometric mean",
        "of the paired ratios B/A, minus 1; 95% t-interval over repeats on the log scale); a winner needs",
        f"the interval to exclude 0 and a difference of at least {MIN_EFFECT:.0%}.",
        "",
        "| metric | A | B | B vs A | 95% CI | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for m in c.metrics:
        lines.append(
            f"| {m.metric} | {m.a:.2f} | {m.b:.2f} | {m.relative_diff:+.1%} | "
            f"[{m.ci_low:+.1%}, {m.ci_high:+.1%}] | {m.verdict} |"
        )
    lines += ["", f"**Verdict (p50): {c.verdict}**", ""]
    return "\n".join(lines)


def run_comparison(
    config: ExperimentConfig,
    a: Side,
    b: Side,
    variants: dict[str, Variant],
    repeats: int,
    run_dir: Path,
    steps: Steps,
) -> Comparison:
    """Serve A and B, then drive the scenario's first level on each in alternating order."""
    import os

    from optiserve.config import cpu_split
    from optiserve.deploy.targets.base import configured_target
    from optiserve.loadtests.runner import level_stem, run_level, write_payloads
    from optiserve.manifest import write_model
    from optiserve.models.resolve import dataset
    from optiserve.pipeline import scenario_from_config, service_spec

    if repeats < 2:
        raise ConfigError(f"--repeats must be at least 2 for a confidence interval (got {repeats})")
    scenario = scenario_from_config(config)
    scenario.require_available()
    level = scenario.levels()[0]
    server_cpus, generator_cpus = cpu_split(
        sorted(os.sched_getaffinity(0)), config.serving.cpus, config.load.generator_cpus
    )
    spec = variants[a.variant_id].model
    inputs, _ = dataset(spec, "eval", config.load.payload_samples)
    payloads = write_payloads(
        run_dir / "payloads.jsonl", inputs, spec.inputs[0].name, config.load.payload_samples
    )
    deployment = configured_target(config)
    deployment.prepare(
        [service_spec(config, variants[side.variant_id], side.runtime) for side in (a, b)], steps
    )
    pairs: list[tuple[BenchResult, BenchResult]] = []
    with (
        steps.task("A/B repeats", total=2 + 2 * repeats) as advance,
        deployment,
    ):
        sides = (a, b)
        endpoints = []
        for side in sides:  # two servers even for an A/A test of one variant
            advance(0, description=f"Starting {side.label}")
            served = service_spec(config, variants[side.variant_id], side.runtime)
            endpoints.append(deployment.start(served, cpus=server_cpus))
            advance(1)
        for i in range(repeats):
            got: list[BenchResult | None] = [None, None]
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                advance(0, description=f"repeat {i + 1}/{repeats}: {'AB'[k]} = {sides[k].label}")
                stem = f"{level_stem(endpoints[k], level)}.{'ab'[k]}{i + 1}"
                result = run_level(
                    endpoints[k],
                    level,
                    payloads,
                    run_dir / "samples",
                    user_class=scenario.user_class or "ClosedLoopUser",
                    cpus=generator_cpus,
                    stem=stem,
                )
                write_model(run_dir / "bench" / f"{stem}.json", result)
                got[k] = result
                advance(1)
            assert got[0] is not None and got[1] is not None
            pairs.append((got[0], got[1]))
    return summarize(a, b, pairs)
