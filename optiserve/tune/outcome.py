"""What `optiserve tune` concludes and writes: the Pareto front over (cost ↓, p99 ↓, accuracy ↑), the
recommended configuration (the cheapest trusted trial that met the SLO), and the files:

- ``tune.json``: every trial measured, the study, the grid size, the recommendation;
- ``tune.md`` and ``tune.html``: the trials table with the Pareto front marked, and (HTML) a chart of
  cost against p99 with the front ringed;
- ``recommended.yaml``: an experiment config with the recommended serving settings (for `optiserve
  serve`, `bench`, `build`, `deploy`), and ``recommended-values.yaml``: the Helm chart's values for it,
  replicas included, which `optiserve deploy --values` installs as they are.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from optiserve.cost import format_usd
from optiserve.fsutil import atomic_write_text

from .trial import TrialOutcome

if TYPE_CHECKING:
    from optiserve.config import ExperimentConfig

    from .space import SearchSpace
    from .study import StudyResult

CLOSEST = 3
"""Configurations shown, with how far they miss, when none meets the SLO."""


def pareto(outcomes: list[TrialOutcome]) -> list[bool]:
    """Per outcome: on the front of the trusted feasible trials (untrusted ones never are)."""
    from optiserve.report_html import pareto_front

    trusted = [o for o in outcomes if o.trusted]
    keys = [
        (
            o.accuracy if o.accuracy is not None else -math.inf,
            o.p99_ms or math.inf,
            o.usd_per_million or math.inf,
        )
        for o in trusted
    ]
    on = dict(zip((id(o) for o in trusted), pareto_front(keys), strict=True))
    return [on.get(id(o), False) for o in outcomes]


def recommended(outcomes: list[TrialOutcome]) -> TrialOutcome | None:
    trusted = [o for o in outcomes if o.trusted and o.usd_per_million is not None]
    return min(trusted, key=lambda o: (o.usd_per_million, o.p99_ms or math.inf), default=None)


def closest(outcomes: list[TrialOutcome]) -> list[str]:
    """One line per configuration nearest to meeting the SLO, with how far it misses."""
    missed = [o for o in outcomes if not o.feasible and o.pruned is None and o.missed is not None]
    missed.sort(key=lambda o: o.miss_ratio if o.miss_ratio is not None else math.inf)
    lines = [f"{o.label}: {o.missed}" for o in missed[:CLOSEST]]
    return lines


def _cost(o: TrialOutcome) -> str:
    if o.pruned is not None:
        return "pruned"
    if not o.feasible:
        return "SLO missed"
    replicas = f" ({o.replicas} replicas)" if o.replicas and o.replicas > 1 else ""
    return format_usd(o.usd_per_million or 0) + replicas


def report_row(o: TrialOutcome, on_front: bool, best: TrialOutcome | None) -> list[str]:
    """One trial's cells in the tune report (Markdown and HTML alike), its note last."""
    note = "; ".join(
        x
        for x in (
            "recommended" if o is best else "",
            "Pareto front" if on_front else "",
            f"noisy after {o.attempts} measurements" if o.noisy else "",
            o.pruned or "",
            o.shared_cpus or "",
        )
        if x
    )
    return [
        o.label,
        f"{o.capacity_rps:.1f}" if o.capacity_rps else "–",
        f"{o.p99_ms:.1f}" if o.p99_ms is not None else "–",
        f"{o.accuracy:.4g}" if o.accuracy is not None else "–",
        _cost(o),
        note,
    ]


HEAD = ["configuration", "capacity at SLO (req/s)", "p99 (ms)", "accuracy", "cost / 1M", "note"]


def render_markdown(config: ExperimentConfig, study: StudyResult, space: SearchSpace) -> str:
    outcomes = study.outcomes
    front = pareto(outcomes)
    best = recommended(outcomes)
    lines = [
        f"# optiserve tune: {study.name}",
        "",
        summary(config, study, space),
        "",
        "| " + " | ".join(HEAD) + " |",
        "|" + "---|" * len(HEAD),
    ]
    order = sorted(
        range(len(outcomes)), key=lambda i: (not outcomes[i].trusted, outcomes[i].usd_per_million or math.inf)
    )
    lines += ["| " + " | ".join(report_row(outcomes[i], front[i], best)) + " |" for i in order]
    lines += ["", verdict(config, best)]
    if best is None:
        lines += [f"- {line}" for line in closest(outcomes)]
    return "\n".join(lines) + "\n"


def summary(config: ExperimentConfig, study: StudyResult, space: SearchSpace) -> str:
    """What was searched, how much of it, and for what."""
    target = (
        f"{config.cost.offered_rps:g} req/s offered"
        if config.cost.offered_rps
        else "its highest rate within the SLO"
    )
    return (
        f"Strategy {study.strategy}; search space {space.describe()}; {len(study.outcomes)} measured "
        f"({study.measured_now} this session) of {study.planned} planned. Objective: the lowest cost per 1M "
        f"inferences with p99 ≤ {config.load.slo_ms:g} ms at {target}, accuracy ≥ the gate "
        f"({config.eval.gate:g} × FP32)."
    )


def verdict(config: ExperimentConfig, best: TrialOutcome | None) -> str:
    if best is None:
        return f"No configuration met the {config.load.slo_ms:g} ms SLO. Closest:"
    return f"Recommended: **{best.label}**, {_cost(best)} / 1M, p99 {best.p99_ms:.1f} ms."


def render_html(config: ExperimentConfig, study: StudyResult, space: SearchSpace) -> str:
    from optiserve.report_html import CSS, Canvas, empty_chart, linear_scale, log_scale

    outcomes = study.outcomes
    front = pareto(outcomes)
    best = recommended(outcomes)
    plotted = [
        (i, o) for i, o in enumerate(outcomes) if o.feasible and o.usd_per_million and o.p99_ms is not None
    ]
    title = "Cost per 1M inferences against p99 at that rate (feasible trials)"
    if plotted:
        canvas = Canvas(
            title,
            "cost per 1M inferences (USD, log scale)",
            "p99 latency (ms)",
            log_scale([o.usd_per_million or 0 for _, o in plotted]),
            linear_scale([o.p99_ms or 0 for _, o in plotted], pad=0.08),
        )
        canvas.axes()
        for n, (i, o) in enumerate(plotted, start=1):
            cx, cy = canvas.px(o.usd_per_million or 0), canvas.py(o.p99_ms or 0)
            color = "#1b7837" if o is best else ("#2166ac" if o.trusted else "#999")
            if front[i]:
                canvas.parts.append(f'<circle class="pareto-ring" cx="{cx:.1f}" cy="{cy:.1f}" r="11"/>')
            kind = "pareto" if front[i] else "dominated"
            canvas.parts.append(
                f'<circle class="point {kind}" cx="{cx:.1f}" cy="{cy:.1f}" r="7" fill="{color}" '
                'fill-opacity="0.75"/>'
                f'<text class="point-label" x="{cx + 12:.1f}" y="{cy + 4:.1f}">{n}</text>'
            )
            canvas.legend_entry(f"{n}: {o.label} — {_cost(o)}, p99 {o.p99_ms:.1f} ms", color, symbol="dot")
        canvas.legend_entry("ringed: the Pareto front (cost ↓, p99 ↓, accuracy ↑)", "#fff", symbol="ring")
        chart = canvas.svg("tradeoff")
    else:
        chart = empty_chart(title, "no trial met the SLO", "tradeoff")
    head = "".join(f"<th>{escape(h)}</th>" for h in HEAD)
    rows = "".join(
        "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in report_row(o, front[i], best)) + "</tr>"
        for i, o in enumerate(outcomes)
    )
    said = escape(summary(config, study, space))
    concluded = escape(verdict(config, best).replace("**", "").removesuffix(" Closest:"))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>optiserve tune: {escape(study.name)}</title><style>{CSS}</style></head>\n<body>\n"
        f"<h1>optiserve tune: {escape(study.name)}</h1><p>{said}</p><p><b>{concluded}</b></p>\n{chart}\n"
        f'<table class="figures"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>\n'
        "</body></html>\n"
    )


def recommended_config(tuned: ExperimentConfig, best: TrialOutcome) -> str:
    """The experiment YAML of the recommendation: the experiment's own settings with the winner's serving
    settings and variant (``serving.variants``), so `serve`, `bench`, `build` and `deploy` take it alone."""
    import yaml

    chosen = tuned.model_dump(mode="json", exclude={"tune"})
    kept = {k: chosen[k] for k in ("model", "workdir", "serving", "cost", "kubernetes")}
    kept["load"] = {"slo_ms": tuned.load.slo_ms}
    return f"# recommended by optiserve tune: {best.label}\n" + yaml.safe_dump(kept, sort_keys=False)


def write_outputs(
    config: ExperimentConfig, study: StudyResult, space: SearchSpace, out_dir: Path
) -> dict[str, Path]:
    """tune.json, tune.md, tune.html and, with a recommendation, recommended.yaml and its Helm values."""

    from optiserve import pipeline
    from optiserve.config import with_overrides
    from optiserve.deploy import k8s

    best = recommended(study.outcomes)
    written = {
        "json": out_dir / "tune.json",
        "md": out_dir / "tune.md",
        "html": out_dir / "tune.html",
    }
    front = pareto(study.outcomes)
    atomic_write_text(
        written["json"],
        json.dumps(
            {
                "study": study.name,
                "strategy": study.strategy,
                "storage": str(study.storage),
                "grid_size": study.grid_size,
                "planned": study.planned,
                "slo_ms": config.load.slo_ms,
                "offered_rps": config.cost.offered_rps,
                "trials": [o.to_attrs() | {"pareto": f} for o, f in zip(study.outcomes, front, strict=True)],
                "recommended": best.to_attrs() if best else None,
            },
            indent=2,
        )
        + "\n",
    )
    atomic_write_text(written["md"], render_markdown(config, study, space))
    atomic_write_text(written["html"], render_html(config, study, space))
    if best is None:
        return written
    candidate = space.from_params(best.params)
    tuned = with_overrides(
        config, {**candidate.overrides(), "serving.variants": [candidate.deployment.variant_id]}
    )
    written["config"] = out_dir / "recommended.yaml"
    atomic_write_text(written["config"], recommended_config(tuned, best))
    variant = space.variants[candidate.deployment.variant_id]
    spec = pipeline.service_spec(tuned, variant, candidate.deployment.runtime)
    values = k8s.build_values(
        [spec],
        repository=config.kubernetes.image_repository,
        baked={(variant.id, spec.runtime): k8s.baked_spec(spec)},
    )
    values["variants"][0]["replicas"] = best.replicas or 1
    written["values"] = k8s.write_values(values, out_dir / "recommended-values.yaml")
    return written
