"""report.html from hand-made results with real sample files: self-contained, parseable, every variant
named, the Pareto front right, text escaped, and an empty report still renders."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from optiserve.config import ExperimentConfig, with_overrides
from optiserve.report import build_report, write_report
from optiserve.report_html import cdf_points, cpu_pinning, pareto_front, render_html
from optiserve.types import BenchResult, Evaluation, Interval, Report, ServerSideStats
from tests.test_cost import NOW, bench_result, variant

WARMUP_S = 1.0


class Page(HTMLParser):
    """Collects what the tests look at: tags, attributes, and the visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in {"circle", "line", "rect", "path", "polyline", "meta"}:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.tags if t == tag)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    assert page.open == [], f"unclosed: {page.open}"
    return page


def write_samples(path: Path, latencies_ms: list[float]) -> str:
    """A samples CSV: slow warm-up requests in the first second, then the given latencies, all ok."""
    lines = ["start_s,latency_ms,ok,error"]
    lines += [f"{0.1 * i:.3f},5000.0,1," for i in range(5)]  # warm-up: must not show in the CDF
    lines += [f"{WARMUP_S + 0.01 * i:.3f},{lat},1," for i, lat in enumerate(latencies_ms)]
    lines.append(f"{WARMUP_S + 5:.3f},1.0,0,ConnectError")  # a failure: not in the latency CDF
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def evaluation(vid: str, value: float, runtime: str = "onnxruntime") -> Evaluation:
    return Evaluation(
        variant_id=vid,
        runtime=runtime,
        reference_variant_id="m.torch.0",
        metric="top1_agreement",
        value=value,
        reference_value=1.0,
        n_samples=64,
        max_abs_diff=1e-3,
        gate=0.9,
        passed=value >= 0.9,
    )


# Three variants. "best" is better than "worse" on accuracy, p99 and cost: "worse" is dominated.
# "accurate" is the most accurate but the slowest and dearest: on the front, as is "best".
VARIANTS = {
    # id: (accuracy, [(users, rps, p99)], latencies for the samples of the highest level)
    "m.onnx.best": (0.99, [(1, 90.0, 12.0), (4, 180.0, 30.0)], [5.0, 10.0, 20.0, 30.0]),
    "m.onnx.int8.worse": (0.95, [(1, 60.0, 25.0), (4, 100.0, 60.0)], [20.0, 40.0, 60.0]),
    "m.ov.accurate": (1.0, [(1, 40.0, 40.0), (4, 50.0, 95.0)], [50.0, 80.0, 95.0]),
}


def sample_results(
    tmp_path: Path, variants: dict[str, tuple[float, list[tuple[int, float, float]], list[float]]]
) -> list[BenchResult]:
    results = []
    for vid, (_, levels, latencies) in variants.items():
        for users, rps, p99 in levels:
            samples = write_samples(tmp_path / f"{vid}.c{users}.samples.csv", latencies)
            results.append(
                bench_result(vid, users=users, rps=rps, p99=p99, samples_path=samples, warmup_s=WARMUP_S)
            )
    return results


@pytest.fixture
def report(tmp_path: Path) -> Report:
    results = sample_results(tmp_path, VARIANTS)
    # CIs and server-side figures on one level, so the table has something to show for them
    first = results[0].model_copy(
        update={
            "ci_p50_ms": Interval(low=5.5, high=6.5),
            "ci_p99_ms": Interval(low=10.0, high=14.0),
            "ci_throughput_rps": Interval(low=88.0, high=92.0),
            "server": ServerSideStats(source="scrape", requests=900, p50_ms=4.2, p99_ms=9.9),
        }
    )
    results[0] = first
    evaluations = [evaluation(vid, acc) for vid, (acc, _, _) in VARIANTS.items()]
    return build_report(
        "mlp",
        {vid: variant(vid) for vid in VARIANTS},
        results,
        evaluations,
        {"m.onnx.int8.x · openvino": "rejected by the accuracy gate"},
        instance="c6i.large",
        slo_ms=100.0,
    )


def test_the_page_is_self_contained_and_complete(report: Report, tmp_path: Path) -> None:
    html = render_html(
        report, tmp_path, {"command": "optiserve run -m mlp -c 1,4", "cpu_pinning": "server 0, client 1"}
    )
    page = parse(html)
    assert page.count("svg") == 4
    assert page.count("script") == 0 and "<script" not in html.lower()
    for tag, attrs in page.tags:
        for name in ("src", "href", "xlink:href", "action", "data"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:)?//", value), f"<{tag} {name}={value!r}>"
    assert "http://" not in html and "https://" not in html  # not even in CSS or text
    assert "@import" not in html and "url(" not in html
    text = " ".join(page.text)
    for vid in VARIANTS:
        assert vid in text
    # the figures table: CIs, server-side figures with their source, the cost, the skipped list, context
    assert "12.0 [10.0–14.0]" in text
    assert "4.2 / 9.9 (scrape)" in text
    assert "c6i.large" in text and "/ 1M" in text
    assert "rejected by the accuracy gate" in text
    assert "optiserve run -m mlp -c 1,4" in text and "server 0, client 1" in text
    assert "Test CPU @ 2.0GHz" in text  # the benchmark machine
    assert re.search(r"python\s+3\.\d+", text)


def circles_by_variant(page: Page) -> dict[str, str]:
    return {
        str(attrs["data-variant"]): str(attrs["class"])
        for tag, attrs in page.tags
        if tag == "circle" and "point" in (attrs.get("class") or "").split()
    }


def test_the_pareto_front_is_marked(report: Report, tmp_path: Path) -> None:
    page = parse(render_html(report, tmp_path, {}))
    marks = circles_by_variant(page)
    assert set(marks) == set(VARIANTS)
    assert "pareto" in marks["m.onnx.best"].split()
    assert "pareto" in marks["m.ov.accurate"].split()
    assert "dominated" in marks["m.onnx.int8.worse"].split()
    assert (
        sum(1 for tag, attrs in page.tags if tag == "circle" and attrs.get("class") == "pareto-ring") == 2 + 1
    )


def test_pareto_front_rules() -> None:
    inf = float("inf")
    # (accuracy ↑, p99 ↓, cost ↓)
    assert pareto_front([(0.9, 10, 1.0), (0.8, 20, 2.0)]) == [True, False]
    assert pareto_front([(0.9, 10, 1.0), (0.95, 20, 2.0)]) == [True, True]  # a trade-off: both on it
    assert pareto_front([(0.9, 10, 1.0), (0.9, 10, 1.0)]) == [True, True]  # equal: neither dominates
    assert pareto_front([(0.9, 10, 1.0), (0.9, 10, 1.5)]) == [True, False]  # worse on cost only
    assert pareto_front([(0.9, 10, inf), (0.9, 10, 1.0)]) == [False, True]  # no cost counts as the worst
    assert pareto_front([]) == []


def test_the_cdf_uses_the_measured_window_of_the_highest_level(tmp_path: Path) -> None:
    path = Path(write_samples(tmp_path / "s.csv", [float(v) for v in range(1, 1001)]))
    points = cdf_points(path, WARMUP_S)
    assert len(points) <= 300
    assert points[-1] == (1000.0, 1.0)  # the slowest measured request; the 5 s warm-up ones are gone
    assert points[0][0] == 1.0
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in itertools.pairwise(points))
    assert max(x for x, _ in cdf_points(path, 0.0)) == 5000.0  # without the cut, they would show


def test_text_is_escaped(tmp_path: Path) -> None:
    evil = "m.<script>alert(1)</script>&"
    variants = {evil: (0.99, [(1, 50.0, 20.0)], [10.0, 20.0])}
    results = sample_results(tmp_path, {"plain": variants[evil]})
    results = [r.model_copy(update={"variant_id": evil}) for r in results]
    report = build_report(
        "<b>model</b>", {}, results, [evaluation(evil, 0.99)], {"<i>x</i>": "why <not>"}, instance="c6i.large"
    )
    html = render_html(report, tmp_path, {"command": "run --name '<x>'"})
    assert "<script" not in html and "<b>model" not in html and "<i>x" not in html
    assert "m.&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in html
    page = parse(html)
    assert evil in " ".join(page.text)
    assert evil in circles_by_variant(page)  # the attribute value round-trips too
    assert page.count("svg") == 4


def test_an_empty_report_renders_with_a_note(tmp_path: Path) -> None:
    empty = Report(created_at=NOW, model="mlp", rows=(), skipped={"everything": "no runtime installed"})
    html = render_html(empty, None, {})
    page = parse(html)
    text = " ".join(page.text)
    assert "no load-test results" in text
    assert "no runtime installed" in text
    assert page.count("svg") == 4 and "No data" in text
    # rows with an evaluation but no results, and results whose samples are gone, render too
    lone = build_report("mlp", {}, [], [evaluation("m.onnx.a", 0.99)], instance="c6i.large")
    gone = build_report(
        "mlp", {}, [bench_result("m.onnx.b", users=2, rps=10, p99=5)], [], instance="c6i.large"
    )
    for rep in (lone, gone):
        page = parse(render_html(rep, tmp_path, {}))
        assert page.count("svg") == 4
    assert "missing.samples.csv not found" in " ".join(parse(render_html(gone, tmp_path, {})).text)


def test_write_report_writes_three_files(report: Report, tmp_path: Path) -> None:
    out = tmp_path / "run"
    paths = write_report(report, out, {"command": "optiserve report"})
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert all(p.is_file() for p in paths)
    assert '"costs"' in paths[0].read_text() and "usd_per_million" in paths[0].read_text()
    assert "cost per 1M inferences" in paths[1].read_text()
    assert parse(paths[2].read_text()).count("svg") == 4


def test_samples_are_found_in_a_moved_results_folder(tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    (moved / "samples").mkdir(parents=True)
    write_samples(moved / "samples" / "x.c1.samples.csv", [3.0, 4.0])
    result = bench_result("m.x", users=1, rps=10, p99=4, samples_path="/gone/samples/x.c1.samples.csv")
    report = build_report("mlp", {}, [result], [], instance="c6i.large")
    html = render_html(report, moved, {})
    assert "not found" not in html
    assert "not found" in render_html(report, tmp_path / "elsewhere", {})


def test_report_created_at_is_shown(report: Report, tmp_path: Path) -> None:
    html = render_html(
        report.model_copy(update={"created_at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)}),
        tmp_path,
        {},
    )
    assert "2026-01-02 03:04:05 UTC" in html


def test_write_report_records_the_cpu_pinning_of_the_run(report: Report, tmp_path: Path) -> None:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        pytest.skip("needs 2 CPUs to pin the server and the generator apart")
    config = with_overrides(
        ExperimentConfig(), {"serving.cpus": [available[-1]], "load.generator_cpus": [available[0]]}
    )
    assert cpu_pinning(config) == f"server CPUs {available[-1]}; load generator CPUs {available[0]}"
    _, _, html_path = write_report(report, tmp_path / "run", {"command": "optiserve run"}, config)
    text = " ".join(parse(html_path.read_text()).text)
    assert f"server CPUs {available[-1]}; load generator CPUs {available[0]}" in text
    # a rebuilt report (no config) says it does not know rather than guessing
    _, _, html_path = write_report(report, tmp_path / "rebuilt", {"command": "optiserve report"})
    assert "CPU pinning not recorded" in " ".join(parse(html_path.read_text()).text)
