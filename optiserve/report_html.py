"""report.html: one self-contained page (inline CSS and SVG, no JavaScript, no network) with the charts,
every figure, and what is needed to reproduce them.

Charts are drawn here, in Python, as plain SVG: a latency CDF per variant × runtime at its highest load
level (from the raw samples, warm-up excluded), p99 against throughput, throughput against concurrency, and
accuracy against p99 against cost with the Pareto front marked. Every piece of text goes through
:func:`html.escape`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from optiserve.cost import describe, format_usd
from optiserve.errors import OptiserveError
from optiserve.report import _METRIC_NAMES, _accuracy, _mb
from optiserve.types import BenchResult, CostEstimate, Interval, LoadSpec, MachineInfo, Report, ReportRow

if TYPE_CHECKING:
    from optiserve.config import ExperimentConfig

# Okabe–Ito: distinguishable with the common colour-vision deficiencies; dashes tell apart the rest.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#999933")
DASHES = ("", "7 4", "2 3", "9 3 2 3")
PACKAGES = ("optiserve", "bentoml", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "locust", "numpy")
CDF_POINTS = 300
"""Points per CDF line: enough for a smooth curve, few enough to keep the file small."""

# --- data -------------------------------------------------------------------------------------------------


def row_label(row: ReportRow) -> str:
    return f"{row.variant_id} · {row.runtime}"


def top_level(row: ReportRow) -> BenchResult | None:
    """The load level with the most concurrency (then the highest offered rate): the hardest one."""
    if not row.results:
        return None
    return max(row.results, key=lambda r: (r.load.users, r.load.rate_rps or 0.0))


def preferred_cost(row: ReportRow) -> CostEstimate | None:
    """The max-throughput-at-SLO estimate, else whatever estimate there is."""
    by_basis = {c.basis: c for c in row.costs}
    return by_basis.get("max-throughput-at-slo") or (row.costs[0] if row.costs else None)


def resolve_samples(samples_path: str, samples_root: Path | None) -> Path | None:
    """The samples file as recorded, else the same name under ``samples_root`` (a moved results folder)."""
    recorded = Path(samples_path)
    candidates = [recorded]
    if samples_root is not None:
        candidates += [
            samples_root / recorded,
            samples_root / "samples" / recorded.name,
            samples_root / recorded.name,
        ]
    return next((p for p in candidates if p.is_file()), None)


def cdf_points(path: Path, warmup_s: float) -> tuple[tuple[float, float], ...]:
    """(latency ms, fraction of successful measured requests at or below it), at most CDF_POINTS points."""
    import numpy as np

    from optiserve.loadtests.stats import measured_window, read_samples

    window = measured_window(read_samples(path), warmup_s)
    lat = np.sort(window.samples.latency_ms[window.samples.ok])
    if lat.size == 0:
        return ()
    idx = np.unique(np.linspace(0, lat.size - 1, min(lat.size, CDF_POINTS)).round().astype(int))
    return tuple((float(lat[i]), float(i + 1) / lat.size) for i in idx)


def pareto_front(points: Sequence[tuple[float, float, float]]) -> list[bool]:
    """For (accuracy ↑, p99 ↓, cost ↓) triples: True where no other point dominates (at least as good on
    all three and strictly better on one). An unknown cost is passed as +inf."""

    def dominates(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
        at_least = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
        return at_least and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])

    return [not any(dominates(o, p) for j, o in enumerate(points) if j != i) for i, p in enumerate(points)]


# --- scales and ticks -------------------------------------------------------------------------------------


def _nice_step(span: float, n: int) -> float:
    raw = span / max(n, 1)
    mag = float(10.0 ** math.floor(math.log10(raw)))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))


@dataclass(frozen=True)
class Scale:
    """Maps data to [0, 1] along one axis; the domain is widened to end on ticks."""

    lo: float
    hi: float
    log: bool = False
    ticks: tuple[float, ...] = ()

    def frac(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            return (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (v - self.lo) / (self.hi - self.lo)


def linear_scale(
    values: Sequence[float], zero: bool = True, n: int = 5, pad: float = 0.0, integer: bool = False
) -> Scale:
    """Ticks at 1, 2, 2.5 or 5 × 10^k; ``zero`` keeps 0 in view, ``pad`` (a fraction of the span) keeps
    points off the frame, ``integer`` keeps ticks on whole numbers (concurrency)."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 1e-12:
        widen = abs(hi) * 0.1 or 1.0
        lo, hi = (lo if zero and lo == 0 else lo - widen), hi + widen
    span = hi - lo
    lo, hi = (lo if zero and lo == 0 else lo - pad * span), hi + pad * span
    step = _nice_step(hi - lo, n)
    if integer:
        step = max(1.0, round(step))
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = tuple(round(lo + i * step, 10) for i in range(round((hi - lo) / step) + 1))
    return Scale(lo, hi, False, ticks)


def log_scale(values: Sequence[float]) -> Scale:
    positive = [v for v in values if v > 0] or [1.0]
    lo = 10 ** math.floor(math.log10(min(positive)))
    hi = 10 ** math.ceil(math.log10(max(positive)))
    if hi <= lo:
        hi = lo * 10
    decades = round(math.log10(hi / lo))
    mults = (1, 2, 5) if decades <= 3 else (1,)
    ticks = tuple(
        round(lo * 10**d * m, 10)
        for d in range(decades + 1)
        for m in mults
        if lo * 10**d * m <= hi * (1 + 1e-9)
    )
    return Scale(lo, hi, True, ticks)


def fmt_num(v: float) -> str:
    if abs(v) >= 10_000:
        return f"{v:,.0f}"
    return f"{v:.6g}"


# --- SVG --------------------------------------------------------------------------------------------------

WIDTH, PLOT_H = 860, 300
LEFT, RIGHT, TOP, BOTTOM = 76, 24, 40, 52
LEGEND_LINE = 18


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    dash: str
    points: tuple[tuple[float, float], ...]
    whiskers: tuple[tuple[float, float, float], ...] = ()
    """(x, low, high) vertical confidence intervals."""
    markers: bool = True


@dataclass
class Canvas:
    """An SVG chart being drawn: a plot area with two scales, then a legend below it."""

    title: str
    xlabel: str
    ylabel: str
    x: Scale
    y: Scale
    legend: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    @property
    def plot_w(self) -> float:
        return WIDTH - LEFT - RIGHT

    def px(self, v: float) -> float:
        return LEFT + self.x.frac(v) * self.plot_w

    def py(self, v: float) -> float:
        return TOP + (1 - self.y.frac(v)) * PLOT_H

    def axes(self) -> None:
        p = self.parts
        for t in self.y.ticks:
            y = self.py(t)
            p.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + self.plot_w}" y2="{y:.1f}"/>')
            p.append(
                f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt_num(t)}</text>'
            )
        for t in self.x.ticks:
            x = self.px(t)
            p.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + PLOT_H}"/>')
            p.append(
                f'<text class="tick" x="{x:.1f}" y="{TOP + PLOT_H + 16}" '
                f'text-anchor="middle">{fmt_num(t)}</text>'
            )
        p.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{self.plot_w}" height="{PLOT_H}"/>')
        p.append(
            f'<text class="label" x="{LEFT + self.plot_w / 2:.1f}" y="{TOP + PLOT_H + 38}" '
            f'text-anchor="middle">{escape(self.xlabel)}</text>'
        )
        cy = TOP + PLOT_H / 2
        p.append(
            f'<text class="label" x="16" y="{cy:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 16 {cy:.1f})">{escape(self.ylabel)}</text>'
        )

    def series(self, s: Series) -> None:
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        if len(s.points) > 1:
            path = " ".join(f"{self.px(x):.1f},{self.py(y):.1f}" for x, y in s.points)
            self.parts.append(f'<polyline class="series" points="{path}" stroke="{s.color}"{dash}/>')
        for x, lo, hi in s.whiskers:
            cx, y1, y2 = self.px(x), self.py(lo), self.py(hi)
            self.parts.append(
                f'<path class="whisker" stroke="{s.color}" d="M{cx:.1f} {y1:.1f}V{y2:.1f}'
                f'M{cx - 4:.1f} {y1:.1f}h8M{cx - 4:.1f} {y2:.1f}h8"/>'
            )
        if s.markers or len(s.points) == 1:
            for x, y in s.points:
                self.parts.append(
                    f'<circle cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="3.5" fill="{s.color}"/>'
                )
        self.legend_entry(s.label, s.color, s.dash)

    def hline(self, y: float, label: str) -> None:
        if not (self.y.lo <= y <= self.y.hi):
            return
        yy = self.py(y)
        self.parts.append(
            f'<line class="ref" x1="{LEFT}" y1="{yy:.1f}" x2="{LEFT + self.plot_w}" y2="{yy:.1f}"/>'
            f'<text class="ref-label" x="{LEFT + self.plot_w - 4}" y="{yy - 4:.1f}" '
            f'text-anchor="end">{escape(label)}</text>'
        )

    def legend_entry(self, label: str, color: str, dash: str = "", symbol: str = "line") -> None:
        y = TOP + PLOT_H + BOTTOM + 8 + len(self.legend) * LEGEND_LINE
        if symbol == "line":
            d = f' stroke-dasharray="{dash}"' if dash else ""
            mark = f'<line x1="{LEFT}" y1="{y}" x2="{LEFT + 28}" y2="{y}" stroke="{color}"'
            mark += f' stroke-width="2.5"{d}/>'
        elif symbol == "ring":
            mark = f'<circle class="pareto-ring" cx="{LEFT + 14}" cy="{y}" r="7"/>'
        else:
            mark = f'<circle cx="{LEFT + 14}" cy="{y}" r="5" fill="{color}" stroke="#222"/>'
        self.legend.append(
            f'<g class="legend">{mark}<text class="legend-text" x="{LEFT + 36}" y="{y + 4}">'
            f"{escape(label)}</text></g>"
        )

    def svg(self, css_class: str) -> str:
        height = TOP + PLOT_H + BOTTOM + 8 + len(self.legend) * LEGEND_LINE + 6
        return (
            f'<svg class="chart {css_class}" role="img" width="{WIDTH}" '
            f'height="{height}" viewBox="0 0 {WIDTH} {height}"><title>{escape(self.title)}</title>'
            f'<text class="chart-title" x="{LEFT}" y="22">{escape(self.title)}</text>'
            + "".join(self.parts)
            + "".join(self.legend)
            + "</svg>"
        )


def empty_chart(title: str, why: str, css_class: str) -> str:
    return (
        f'<svg class="chart {css_class}" role="img" width="{WIDTH}" '
        f'height="90" viewBox="0 0 {WIDTH} 90"><title>{escape(title)}</title>'
        f'<text class="chart-title" x="{LEFT}" y="22">{escape(title)}</text>'
        f'<text class="empty" x="{LEFT}" y="56">No data: {escape(why)}</text></svg>'
    )


def line_chart(
    title: str,
    xlabel: str,
    ylabel: str,
    series: Sequence[Series],
    css_class: str,
    *,
    xlog: bool = False,
    y_fixed: tuple[float, float] | None = None,
    hlines: Sequence[tuple[float, str]] = (),
    x_integer: bool = False,
) -> str:
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points] + [
        v for s in series for _, lo, hi in s.whiskers for v in (lo, hi)
    ]
    if not xs:
        return empty_chart(title, "no series to draw", css_class)
    x = log_scale(xs) if xlog else linear_scale(xs, pad=0.03, integer=x_integer)
    y = linear_scale(list(y_fixed)) if y_fixed else linear_scale(ys + [h for h, _ in hlines])
    canvas = Canvas(title, xlabel, ylabel, x, y)
    canvas.axes()
    for h, label in hlines:
        canvas.hline(h, label)
    for s in series:
        canvas.series(s)
    return canvas.svg(css_class)


def style_of(i: int) -> tuple[str, str]:
    """Colour and dash of the i-th variant × runtime, the same in every chart."""
    return PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]


# --- the four charts --------------------------------------------------------------------------------------


def chart_cdf(report: Report, samples_root: Path | None) -> tuple[str, list[str]]:
    """Latency CDF at each row's highest load level; also what could not be drawn, and why."""
    series, notes = [], []
    for i, row in enumerate(report.rows):
        level = top_level(row)
        if level is None:
            continue
        path = resolve_samples(level.samples_path, samples_root)
        if path is None:
            notes.append(f"{row_label(row)}: samples file {level.samples_path} not found")
            continue
        try:
            points = cdf_points(path, level.load.warmup_s)
        except (OSError, ValueError, KeyError) as e:
            notes.append(f"{row_label(row)}: samples file {path} unreadable ({e})")
            continue
        if not points:
            notes.append(f"{row_label(row)}: no successful request in the measured window")
            continue
        color, dash = style_of(i)
        label = f"{row_label(row)} ({load_text(level.load)})"
        series.append(Series(label, color, dash, points, markers=False))
    xs = [x for s in series for x, _ in s.points]
    xlog = bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 20
    svg = line_chart(
        "Latency CDF at the highest load level (client-side, warm-up excluded)",
        "latency (ms" + (", log scale)" if xlog else ")"),
        "fraction of requests ≤ latency",
        series,
        "cdf",
        xlog=xlog,
        y_fixed=(0.0, 1.0),
        hlines=[(0.5, "p50"), (0.99, "p99")],
    )
    return svg, notes


def _slo(report: Report) -> float | None:
    return next((c.slo_ms for row in report.rows for c in row.costs), None)


def chart_p99_vs_throughput(report: Report) -> str:
    series = []
    for i, row in enumerate(report.rows):
        levels = [r for r in row.results if r.latency_ms is not None]
        if not levels:
            continue
        color, dash = style_of(i)
        points = tuple((r.throughput_rps, r.latency_ms.p99) for r in levels if r.latency_ms)
        whiskers = tuple((r.throughput_rps, r.ci_p99_ms.low, r.ci_p99_ms.high) for r in levels if r.ci_p99_ms)
        series.append(Series(row_label(row), color, dash, points, whiskers))
    slo = _slo(report)
    return line_chart(
        "p99 latency against throughput, one point per load level (95% CI whiskers where measured)",
        "throughput (successful req/s)",
        "p99 latency (ms)",
        series,
        "p99-throughput",
        hlines=[(slo, f"SLO {slo:g} ms")] if slo is not None else [],
    )


def chart_throughput_vs_concurrency(report: Report) -> str:
    series = []
    for i, row in enumerate(report.rows):
        levels = sorted((r for r in row.results if r.load.load_model == "closed"), key=lambda r: r.load.users)
        if not levels:
            continue
        color, dash = style_of(i)
        points = tuple((float(r.load.users), r.throughput_rps) for r in levels)
        whiskers = tuple(
            (float(r.load.users), r.ci_throughput_rps.low, r.ci_throughput_rps.high)
            for r in levels
            if r.ci_throughput_rps
        )
        series.append(Series(row_label(row), color, dash, points, whiskers))
    return line_chart(
        "Throughput against concurrency (closed loop; 95% CI whiskers where measured)",
        "concurrent users",
        "throughput (successful req/s)",
        series,
        "throughput-concurrency",
        x_integer=True,
    )


@dataclass(frozen=True)
class TradeOff:
    """One variant × runtime in the accuracy / p99 / cost chart."""

    index: int
    row: ReportRow
    accuracy: float
    p99_ms: float
    cost: CostEstimate | None

    @property
    def key(self) -> tuple[float, float, float]:
        return (self.accuracy, self.p99_ms, self.cost.usd_per_million if self.cost else math.inf)


def trade_offs(report: Report) -> list[TradeOff]:
    found = []
    for i, row in enumerate(report.rows):
        level = top_level(row)
        if row.accuracy is None or level is None or level.latency_ms is None:
            continue
        found.append(TradeOff(i, row, row.accuracy.value, level.latency_ms.p99, preferred_cost(row)))
    return found


def chart_tradeoff(report: Report, points: list[TradeOff], front: list[bool]) -> str:
    title = "Accuracy against p99 (highest load level) against cost per 1M inferences"
    if not points:
        return empty_chart(title, "no variant has both an accuracy figure and a load test", "tradeoff")
    metrics = sorted({_METRIC_NAMES[p.row.accuracy.metric] for p in points if p.row.accuracy})
    acc = [p.accuracy for p in points]
    canvas = Canvas(
        title,
        "p99 latency at the highest load level (ms)",
        f"accuracy ({', '.join(metrics)})",
        linear_scale([p.p99_ms for p in points], pad=0.08),
        linear_scale(acc, zero=False, pad=0.08),
    )
    canvas.axes()
    costs = [p.cost.usd_per_million for p in points if p.cost]
    lo, hi = (min(costs), max(costs)) if costs else (0.0, 0.0)
    for n, (p, on_front) in enumerate(zip(points, front, strict=True), start=1):
        color, _ = style_of(p.index)
        r = (
            5.0
            if p.cost is None
            else 6.0 + (10.0 * math.sqrt((p.cost.usd_per_million - lo) / (hi - lo)) if hi > lo else 4.0)
        )
        cx, cy = canvas.px(p.p99_ms), canvas.py(p.accuracy)
        cls = "point pareto" if on_front else "point dominated"
        fill = "#fff" if p.cost is None else color
        data = f'data-variant="{escape(p.row.variant_id)}" data-runtime="{escape(p.row.runtime)}"'
        if on_front:
            canvas.parts.append(f'<circle class="pareto-ring" cx="{cx:.1f}" cy="{cy:.1f}" r="{r + 4:.1f}"/>')
        canvas.parts.append(
            f'<circle class="{cls}" {data} cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" fill="{fill}" '
            f'stroke="{color}" stroke-width="2" fill-opacity="0.75"/>'
            f'<text class="point-label" x="{cx + r + 5:.1f}" y="{cy + 4:.1f}">{n}</text>'
        )
        cost = format_usd(p.cost.usd_per_million) + " / 1M" if p.cost else "no cost (SLO not met)"
        flag = " — Pareto front" if on_front else ""
        canvas.legend_entry(
            f"{n}: {row_label(p.row)} — p99 {p.p99_ms:.1f} ms, accuracy {p.accuracy:.4g}, {cost}{flag}",
            fill,
            symbol="dot",
        )
    canvas.legend_entry(
        "ringed: the Pareto front (no other point as good on accuracy ↑, p99 ↓, cost ↓ and better on one); "
        "size: cost",
        "#fff",
        symbol="ring",
    )
    return canvas.svg("tradeoff")


# --- tables -----------------------------------------------------------------------------------------------


def load_text(load: LoadSpec) -> str:
    if load.load_model == "closed":
        return f"closed, {load.users} user{'s' if load.users != 1 else ''}"
    rate = f"{load.rate_rps:g} req/s" if load.rate_rps else "profile"
    return f"open, {rate} ({load.arrival}), ≤ {load.users} in flight"


def with_ci(value: float, ci: Interval | None, digits: int = 1) -> str:
    text = f"{value:.{digits}f}"
    return f"{text} [{ci.low:.{digits}f}–{ci.high:.{digits}f}]" if ci else text


def _cell(text: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{escape(text)}</td>"


def _table(head: Sequence[str], rows: Sequence[str], css_class: str) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(rows) if rows else f'<tr><td colspan="{len(head)}">none</td></tr>'
    return f'<table class="{css_class}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def summary_table(report: Report, points: list[TradeOff], front: list[bool]) -> str:
    on_front = {p.row.variant_id + "\0" + p.row.runtime: f for p, f in zip(points, front, strict=True)}
    rows = []
    for row in report.rows:
        level = top_level(row)
        p99 = f"{level.latency_ms.p99:.1f} ({load_text(level.load)})" if level and level.latency_ms else "–"
        costs = "; ".join(describe(c) for c in row.costs) or "– (no level met the p99 SLO without errors)"
        pareto = on_front.get(row.variant_id + "\0" + row.runtime)
        rows.append(
            "<tr>"
            + _cell(row.variant_id, "id")
            + _cell(row.runtime)
            + _cell(row.precision)
            + _cell(_mb(row.size_bytes))
            + _cell(
                _accuracy(row.accuracy) + (" — rejected" if row.accuracy and not row.accuracy.passed else "")
            )
            + _cell(p99, "num")
            + _cell(costs)
            + _cell("–" if pareto is None else ("yes" if pareto else "no"))
            + "</tr>"
        )
    head = [
        "variant",
        "runtime",
        "precision",
        "size",
        "accuracy",
        "p99 ms at highest load",
        "cost",
        "Pareto front",
    ]
    return _table(head, rows, "summary")


def _server(r: BenchResult) -> str:
    s = r.server
    if s is None:
        return "–"
    p50 = f"{s.p50_ms:.1f}" if s.p50_ms is not None else "–"
    p99 = f"{s.p99_ms:.1f}" if s.p99_ms is not None else "–"
    return f"{p50} / {p99} ({s.source})"


def _integrity(r: BenchResult) -> str:
    i = r.integrity
    stable = {True: "stable", False: "unstable", None: "stability unknown"}[i.stable]
    return "; ".join([stable, *i.flags])


def _errors(r: BenchResult) -> str:
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(r.errors_by_kind.items()))
    return f"{r.n_errors}/{r.n_requests}" + (f" ({kinds})" if kinds else "")


def figures_table(report: Report) -> str:
    rows = []
    for row in report.rows:
        for r in row.results:
            lat = r.latency_ms
            rows.append(
                "<tr>"
                + _cell(row.variant_id, "id")
                + _cell(row.runtime)
                + _cell(load_text(r.load))
                + _cell(str(lat.n) if lat else "0", "num")
                + _cell(with_ci(lat.p50, r.ci_p50_ms) if lat else "–", "num")
                + _cell(with_ci(lat.p99, r.ci_p99_ms) if lat else "–", "num")
                + _cell(with_ci(r.throughput_rps, r.ci_throughput_rps), "num")
                + _cell(_errors(r), "num")
                + _cell(_server(r), "num")
                + _cell(_integrity(r))
                + "</tr>"
            )
    head = [
        "variant",
        "runtime",
        "load",
        "n measured",
        "p50 ms [95% CI]",
        "p99 ms [95% CI]",
        "req/s [95% CI]",
        "errors",
        "server p50 / p99 ms (source)",
        "integrity",
    ]
    return _table(head, rows, "figures")


# --- reproducibility --------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """python and whichever of PACKAGES are installed."""
    import platform
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def cpu_pinning(config: ExperimentConfig) -> str:
    """The CPUs the servers and the load generator were pinned to, as optiserve.pipeline.bench chose them."""
    from optiserve.config import cpu_split

    if not hasattr(os, "sched_getaffinity"):
        return "none (no CPU affinity on this platform)"
    try:
        server, generator = cpu_split(
            sorted(os.sched_getaffinity(0)), config.serving.cpus, config.load.generator_cpus
        )
    except OptiserveError as e:
        return f"unknown ({e.one_line()})"
    if server is None or generator is None:
        return "none (a single CPU)"
    servers, generators = (", ".join(map(str, sorted(cpus))) for cpus in (server, generator))
    return f"server CPUs {servers}; load generator CPUs {generators}"


def describe_machine(m: MachineInfo) -> str:
    return f"{m.cpu_model}, {m.logical_cpus} logical CPUs, {m.memory_gib} GiB, {m.platform} ({m.hostname})"


def live_context() -> dict[str, str]:
    """Versions and machine of the process writing the report (for a report with no run manifest)."""
    from optiserve.hardware import machine_info

    context = {f"version: {k}": v for k, v in package_versions().items()}
    context["this machine (CPU model and count)"] = describe_machine(machine_info())
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        context["CPU affinity of the process writing this report"] = ", ".join(map(str, cpus))
    return context


def reproducibility(report: Report, context: dict[str, str]) -> str:
    """The block that says how the figures were obtained. ``context`` comes from the run's manifest
    (:func:`optiserve.run_manifest.manifest_context`); without recorded versions, the writing process's
    own are shown (:func:`live_context`), labelled as such."""
    context = dict(context)
    if not any(key.startswith("version: ") for key in context):
        context = live_context() | context
    items: list[tuple[str, str]] = [("report created", f"{report.created_at:%Y-%m-%d %H:%M:%S} UTC")]
    items += [(k, context.pop(k)) for k in list(context) if k.startswith("version: ")]
    measured = next((r.machine for row in report.rows for r in row.results), None)
    if measured is not None:
        items.append(("benchmark machine", describe_machine(measured)))
    items.append(("CPU pinning", context.pop("cpu_pinning", context.pop("cpu pinning", "not recorded"))))
    items.append(("command", context.pop("command", "not recorded")))
    items += sorted(context.items())
    rows = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(v)}</code></td></tr>" for k, v in items)
    return f'<table class="repro"><tbody>{rows}</tbody></table>'


# --- the page ---------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;margin:24px auto;
max-width:1200px;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
.note{color:#555}.empty-note{background:#fff8e1;border:1px solid #f0d58c;padding:8px 12px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d6d6d6;padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#f3f3f3}td.num{text-align:right;white-space:nowrap}td.id{font-family:monospace}
table.repro th{background:#f7f7f7;font-weight:600}
svg.chart{display:block;max-width:100%;height:auto;margin:12px 0;background:#fff}
svg .grid{stroke:#e6e6e6;stroke-width:1}svg .frame{fill:none;stroke:#444;stroke-width:1}
svg .tick{font-size:11px;fill:#333}svg .label{font-size:12px;fill:#111}
svg .chart-title{font-size:14px;font-weight:600;fill:#111}
svg .series{fill:none;stroke-width:2}svg .whisker{fill:none;stroke-width:1.5}
svg .ref{stroke:#888;stroke-dasharray:4 4}svg .ref-label{font-size:11px;fill:#555}
svg .legend-text{font-size:12px;fill:#222}svg .empty{font-size:13px;fill:#666}
svg .pareto-ring{fill:none;stroke:#111;stroke-width:2}
svg .point-label{font-size:12px;font-weight:600;fill:#111}
"""


def render_html(report: Report, samples_root: Path | None, context: dict[str, str]) -> str:
    """The whole page. ``samples_root``: where to look for raw samples when the recorded paths moved."""
    points = trade_offs(report)
    front = pareto_front([p.key for p in points])
    cdf, cdf_notes = chart_cdf(report, samples_root)
    has_results = any(row.results for row in report.rows)
    body = [
        f"<h1>optiserve report: {escape(report.model)}</h1>",
        f'<p class="note">Created {report.created_at:%Y-%m-%d %H:%M:%S} UTC. Latency is measured by the '
        "client over HTTP on the requests that started after the warm-up; accuracy in process against the "
        "FP32 source model. Cost per 1M inferences = price per hour × replicas ÷ (throughput × 3600) × 10⁶, "
        "from on-demand list prices (check them against your provider).</p>",
    ]
    if not has_results:
        body.append('<p class="empty-note">This report has no load-test results: nothing was measured.</p>')
    body += ["<h2>Variants</h2>", summary_table(report, points, front), "<h2>Charts</h2>", cdf]
    body += [f'<p class="note">{escape(n)}</p>' for n in cdf_notes]
    body += [chart_p99_vs_throughput(report), chart_throughput_vs_concurrency(report)]
    body += [chart_tradeoff(report, points, front), "<h2>Every figure</h2>", figures_table(report)]
    body.append("<h2>Skipped</h2>")
    if report.skipped:
        items = "".join(f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in report.skipped.items())
        body.append(f"<ul>{items}</ul>")
    else:
        body.append('<p class="note">Nothing was skipped.</p>')
    body += ["<h2>Reproducibility</h2>", reproducibility(report, context)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>optiserve report: {escape(report.model)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
