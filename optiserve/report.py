"""The report: a pure function of results, written as report.json, report.md and a self-contained
report.html, shown as a Rich table."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from optiserve.cost import PriceTable, describe, estimate_costs, load_prices
from optiserve.fsutil import atomic_write_text
from optiserve.pipeline import Plan
from optiserve.types import BenchResult, Evaluation, Interval, Report, ReportRow, Variant

if TYPE_CHECKING:
    from optiserve.config import ExperimentConfig


def build_report(
    model: str,
    variants: dict[str, Variant],
    results: list[BenchResult],
    evaluations: list[Evaluation],
    skipped: dict[str, str] | None = None,
    *,
    instance: str | None = None,
    slo_ms: float = 100.0,
    offered_rps: float | None = None,
    prices: PriceTable | None = None,
    created_at: dt.datetime | None = None,
) -> Report:
    """One row per variant × runtime, with its cost per 1M inferences on ``instance``.

    ``instance`` defaults to a CPU instance with as many vCPUs as the benchmark machine had (see
    :meth:`PriceTable.default_instance`); ``prices`` to the packaged table; ``created_at`` to now (a
    report rebuilt from a run's manifest takes the run's finish time, so it is the same every time).
    """
    prices = prices if prices is not None else load_prices(None)
    if instance is None:
        instance = prices.default_instance(results[0].machine.logical_cpus if results else None)
    evals = {(e.variant_id, e.runtime): e for e in evaluations}
    keys: list[tuple[str, str]] = []
    for key in [*evals, *((r.variant_id, r.runtime) for r in results)]:
        if key not in keys:
            keys.append(key)
    rows = []
    for vid, runtime in keys:
        mine = sorted((r for r in results if (r.variant_id, r.runtime) == (vid, runtime)), key=level_key)
        variant = variants.get(vid)
        rows.append(
            ReportRow(
                variant_id=vid,
                runtime=runtime,
                precision=variant.precision if variant else (mine[0].precision if mine else "fp32"),
                size_bytes=variant.size_bytes if variant else 0,
                accuracy=evals.get((vid, runtime)),
                results=tuple(mine),
                costs=estimate_costs(mine, prices, instance, slo_ms, offered_rps),
            )
        )
    return Report(
        created_at=created_at or dt.datetime.now(dt.UTC),
        model=model,
        rows=tuple(rows),
        skipped=dict(skipped or {}),
    )


LevelKey = tuple[int, float]


def level_key(result: BenchResult) -> LevelKey:
    """Closed-loop levels by users, then open-loop levels by offered rate."""
    load = result.load
    return (0, float(load.users)) if load.load_model == "closed" else (1, float(load.rate_rps or 0.0))


def level_label(key: LevelKey, short: bool = False) -> str:
    kind, value = key
    if kind == 0:
        n = int(value)
        return f"c={n}" if short else f"{n} user{'s' if n > 1 else ''}"
    return f"{value:g} req/s"


def concurrencies(report: Report) -> list[LevelKey]:
    """The report's columns: every load level some variant ran (closed by users, open by rate)."""
    return sorted({level_key(r) for row in report.rows for r in row.results})


_METRIC_NAMES = {
    "top1_accuracy": "top-1 acc",
    "top1_agreement": "top-1 agree",
    "sts_spearman": "STS Spearman",
    "cosine_similarity": "cosine",
    "max_abs_diff": "max|Δ|",
}


def _ratio(ev: Evaluation) -> str:
    """``= 99.4% of FP32 [97.6, 101.1]``: the gated ratio and its paired-bootstrap interval."""
    if ev.ratio is None:
        return ""
    ci = f" [{ev.ratio_ci.low * 100:.1f}, {ev.ratio_ci.high * 100:.1f}]" if ev.ratio_ci else ""
    return f" = {ev.ratio * 100:.1f}% of FP32{ci}"


def _accuracy(ev: Evaluation | None) -> str:
    if ev is None:
        return "–"
    name = _METRIC_NAMES[ev.metric]
    if ev.metric == "top1_accuracy":
        return f"{name} {ev.value * 100:.1f}%{_ratio(ev)} (n={ev.n_samples})"
    if ev.metric == "top1_agreement":
        ci = f" [{ev.value_ci.low * 100:.1f}, {ev.value_ci.high * 100:.1f}]" if ev.value_ci else ""
        return f"{name} {ev.value * 100:.1f}%{ci} (n={ev.n_samples}, no labels)"
    if ev.metric == "sts_spearman":
        return f"{name} {ev.value:.3f}{_ratio(ev)} (n={ev.n_samples} pairs)"
    if ev.metric == "cosine_similarity":
        return f"{name} {ev.value:.4f} (n={ev.n_samples})"
    return f"{name} {ev.value:.2e} (n={ev.n_samples})"


def _gated_accuracy(ev: Evaluation | None) -> str:
    """The accuracy cell of the run report: rejected variants say so (they were not load-tested)."""
    text = _accuracy(ev)
    return f"{text} — rejected" if ev is not None and not ev.passed else text


def _cells(row: ReportRow, key: LevelKey) -> tuple[str, str, str]:
    r = next((r for r in row.results if level_key(r) == key), None)
    if r is None:
        return "–", "–", "–"
    lat = f"{r.latency_ms.p50:.1f} / {r.latency_ms.p99:.1f}" if r.latency_ms else "–"
    return lat, f"{r.throughput_rps:.1f}", f"{r.n_errors}/{r.n_requests}"


def _mb(n: int) -> str:
    if n == 0:  # a model served elsewhere (bench --url): no artifact here
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render_table(report: Report) -> Table:
    table = Table(title=f"optiserve: {report.model} — {_load_words(report)}, warm-up excluded")
    table.add_column("variant", no_wrap=True)
    table.add_column("runtime", no_wrap=True)
    table.add_column("prec")
    table.add_column("size", justify="right")
    table.add_column("accuracy vs FP32 [95% CI]", justify="right")
    levels = concurrencies(report)
    for key in levels:
        table.add_column(f"{level_label(key)}: p50/p99 ms · req/s · errors", justify="right")
    table.add_column("cost per 1M inferences", overflow="fold")
    for row in report.rows:
        cells: list[str] = [
            row.variant_id,
            row.runtime,
            row.precision,
            _mb(row.size_bytes),
            _gated_accuracy(row.accuracy),
        ]
        for key in levels:
            lat, rps, errs = _cells(row, key)
            cells.append(f"{lat} · {rps} · {errs}")
        cells.append(escape(_costs(row)))
        table.add_row(*cells)
    return table


def _costs(row: ReportRow, sep: str = "\n") -> str:
    """Every estimate of a row, or why there is none."""
    if row.costs:
        return sep.join(describe(c) for c in row.costs)
    return "– (not load-tested)" if not row.results else "– (no level met the p99 SLO without errors)"


SERVED_BY = {
    "local": "one local `bentoml serve` process per variant",
    "docker": "one container per variant (its image, run with the chart's pod settings)",
    "kubernetes": "one Helm release per variant on Kubernetes (through kubectl port-forward)",
    "url": "a server named by URL",
}


def _encoding_words(report: Report) -> str:
    encodings = dict.fromkeys(r.load.encoding for row in report.rows for r in row.results) or {"binary": None}
    return " and ".join("binary tensors" if e == "binary" else "JSON tensors" for e in encodings)


def _served_by(report: Report) -> str:
    """Which deployment targets served the results, in words."""
    targets = dict.fromkeys(r.endpoint.target for row in report.rows for r in row.results)
    return "; ".join(SERVED_BY[t] for t in targets) or SERVED_BY["local"]


def render_markdown(report: Report) -> str:
    levels = concurrencies(report)
    head = ["variant", "runtime", "precision", "size", "accuracy vs FP32"]
    for key in levels:
        label = level_label(key, short=True)
        head += [f"{label} p50 / p99 (ms)", f"{label} req/s", f"{label} errors"]
    head.append("cost per 1M inferences")
    lines = [
        f"# optiserve report: {report.model}",
        "",
        f"Created {report.created_at:%Y-%m-%d %H:%M:%S} UTC. Load: {_load_words(report)} over HTTP (Open "
        f"Inference Protocol, {_encoding_words(report)}) against {_served_by(report)}; warm-up "
        "excluded. Accuracy: in-process, against the FP32 source model on held-out inputs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in report.rows:
        cells = [
            f"`{row.variant_id}`",
            row.runtime,
            row.precision,
            _mb(row.size_bytes),
            _gated_accuracy(row.accuracy),
        ]
        for key in levels:
            cells.extend(_cells(row, key))
        cells.append(_costs(row, "<br>"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cost per 1M inferences = price per hour × replicas ÷ (throughput × 3600) × 10⁶, from the highest "
        "measured throughput whose p99 met the SLO with no errors, and on-demand list prices from "
        "`optiserve/data/prices.yaml` (check them against the provider's current prices).",
    ]
    sample_counts = [r for row in report.rows for r in row.results]
    if sample_counts:
        machine = sample_counts[0].machine
        lines += [
            "",
            f"Machine: {machine.cpu_model}, {machine.logical_cpus} logical CPUs, {machine.memory_gib} GiB.",
        ]
        lines += [
            "",
            "Each latency figure is over the requests measured after warm-up; counts are in `report.json`.",
        ]
    lines += _accuracy_section(report)
    lines += _integrity_section(report)
    if report.skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- **{what}**: {why}" for what, why in report.skipped.items()]
    return "\n".join(lines) + "\n"


def _pct(value: float | None, n: int | None = None) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.1f}%" + (f" (n={n})" if n is not None else "")


def _accuracy_section(report: Report) -> list[str]:
    """The gate's evidence per variant: the task metric with its interval, the ratio to FP32 with its
    paired interval, top-5, and agreement with FP32 split into decided samples and near ties."""
    evals = [row.accuracy for row in report.rows if row.accuracy is not None]
    if not evals:
        return []
    lines = [
        "",
        "## Accuracy",
        "",
        f"Evaluated in process on {evals[0].data or f'{evals[0].n_samples} held-out samples'}. "
        + (
            "The gate uses the task metric (top-1 accuracy on labelled data): a variant is rejected when "
            f"its accuracy is below {evals[0].gate} × FP32's (point estimate); 95% intervals in brackets "
            "(bootstrap over samples; paired for the ratio). Agreement with FP32 is a secondary figure, "
            "split into decided samples and near ties (FP32's top-2 probabilities within 0.05)."
            if evals[0].metric == "top1_accuracy"
            else "No labels: the gate falls back to agreement with FP32, which measures closeness to FP32, "
            "not accuracy."
        ),
        "",
        "| variant | runtime | metric | value | FP32 | ratio to FP32 | top-5 "
        "| agreement: decided / near ties | stress set agreement | gate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        ev = row.accuracy
        if ev is None:
            continue
        value = f"{ev.value * 100:.1f}%" + (
            f" [{ev.value_ci.low * 100:.1f}, {ev.value_ci.high * 100:.1f}]" if ev.value_ci else ""
        )
        ratio = "–" if ev.ratio is None else _ratio(ev).removeprefix(" = ").replace(" of FP32", "")
        top5 = f"{_pct(ev.top5)} vs {_pct(ev.reference_top5)}" if ev.top5 is not None else "–"
        split = f"{_pct(ev.agreement_decided, ev.n_decided)} / {_pct(ev.agreement_ties, ev.n_ties)}"
        verdict = "–" if ev.gate is None else ("pass" if ev.passed else "**rejected**")
        lines.append(
            f"| `{row.variant_id}` | {row.runtime} | {_METRIC_NAMES[ev.metric]} (n={ev.n_samples}) | {value} "
            f"| {ev.reference_value * 100:.1f}% | {ratio} | {top5} | {split} "
            f"| {_pct(ev.stress_agreement, ev.stress_n)} | {verdict} |"
        )
    return lines


def _load_words(report: Report) -> str:
    models = {r.load.load_model for row in report.rows for r in row.results}
    if models == {"open"}:
        return "open loop (requests sent on a schedule; latency from the scheduled send)"
    if models == {"closed"}:
        return "closed loop (N concurrent users, no think time)"
    return "closed and open loops"


def _ci(value: float, interval: Interval | None) -> str:
    return f"{value:.1f} [{interval.low:.1f}, {interval.high:.1f}]" if interval else f"{value:.1f}"


def _integrity_section(report: Report) -> list[str]:
    """Every level with its sample count, 95% intervals, server-side figures and integrity flags."""
    results = [r for row in report.rows for r in row.results]
    if not results:
        return []
    lines = [
        "",
        "## Every level",
        "",
        "95% bootstrap intervals in brackets; *stable*: throughput and p99 within 10% across the level's "
        "thirds; server-side figures from the service's own histograms.",
        "",
        "| variant | runtime | level | n | p50 ms | p99 ms | req/s | stable | server p50 / p99 ms | flags |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lat = r.latency_ms
        server = r.server
        srv = (
            f"{server.p50_ms:.1f} / {server.p99_ms:.1f} ({server.source})"
            if server and server.p50_ms is not None and server.p99_ms is not None
            else "–"
        )
        stable = {True: "yes", False: "**no**", None: "–"}[r.integrity.stable]
        lines.append(
            f"| `{r.variant_id}` | {r.runtime} | {level_label(level_key(r))} | {lat.n if lat else 0} | "
            f"{_ci(lat.p50, r.ci_p50_ms) if lat else '–'} | {_ci(lat.p99, r.ci_p99_ms) if lat else '–'} | "
            f"{_ci(r.throughput_rps, r.ci_throughput_rps)} | {stable} | {srv} | "
            f"{'; '.join(r.integrity.flags) or '–'} |"
        )
    return lines


def write_report(
    report: Report,
    out_dir: Path,
    context: dict[str, str] | None = None,
    config: ExperimentConfig | None = None,
) -> tuple[Path, Path, Path]:
    """report.json, report.md and report.html in ``out_dir``.

    ``context`` (e.g. the command line) goes into the HTML's reproducibility block, with the CPU pinning
    the run used when its ``config`` is given. Raw samples are looked up under ``out_dir`` when moved.
    """
    from optiserve.report_html import cpu_pinning, render_html

    context = dict(context or {})
    if config is not None and "cpu_pinning" not in context:
        context["cpu_pinning"] = cpu_pinning(config)
    measurement = (
        out_dir / "measurement.txt"
    )  # written by the bench stage: where server-side figures came from
    if measurement.is_file() and "server-side figures" not in context:
        context["server-side figures"] = measurement.read_text().strip()
    json_path, md_path, html_path = out_dir / "report.json", out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(json_path, json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    md = render_markdown(report)
    if "server-side figures" in context:
        md += f"\nServer-side figures: {context['server-side figures']}.\n"
    atomic_write_text(md_path, md)
    atomic_write_text(html_path, render_html(report, out_dir, context))
    return json_path, md_path, html_path


def _status(ev: Evaluation | None) -> str:
    if ev is None:
        return "not evaluated"
    if ev.gate is None:
        return "ok (not gated)"
    return "ok" if ev.passed else f"[red]rejected[/] (< {ev.gate:g} × FP32)"


def render_variants_table(model: str, plan: Plan, evaluations: dict[tuple[str, str], Evaluation]) -> Table:
    """The `optiserve optimize` table: one row per variant × runtime, plus a row per skipped step."""
    table = Table(title=f"Variants of {model} (in-process; accuracy on held-out data)")
    for col in ("variant", "chain", "runtime", "size", "params", "accuracy vs FP32 [95% CI]"):
        table.add_column(col, overflow="fold")
    table.add_column("p50 b=1 ms", justify="right")
    table.add_column("throughput", justify="right")
    table.add_column("status", overflow="fold")
    for variant, runtime in plan.pairs:
        ev = evaluations.get((variant.id, runtime))
        lat = ev.latency if ev else None
        table.add_row(
            variant.id,
            variant.chain,
            runtime,
            _mb(variant.size_bytes),
            f"{variant.parameters:,}" if variant.parameters else "–",
            _accuracy(ev),
            (f"{lat.batch1_p50_ms:.2f}" if lat.batch1_p50_ms >= 0.1 else f"{lat.batch1_p50_ms:.4f}")
            if lat
            else "–",
            f"{lat.batch_throughput:,.0f}/s @{lat.batch}" if lat else "–",
            _status(ev),
        )
    for what, why in plan.skipped.items():
        table.add_row(escape(what), "", "", "", "", "", "", "", f"[yellow]skipped[/]: {escape(why)}")
    return table
