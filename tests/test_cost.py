"""Cost per 1M inferences: the formula, which load level counts, replicas for an offered load, the price
table (packaged and overridden), and how a bad price file is reported."""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path

import pytest

from optiserve.cost import (
    best_at_slo,
    cost_at_offered_load,
    cost_at_slo,
    estimate_costs,
    load_prices,
    packaged_prices,
    usd_per_million,
)
from optiserve.errors import ConfigError
from optiserve.report import build_report, render_markdown
from optiserve.types import (
    BenchResult,
    Endpoint,
    LatencyStats,
    LoadSpec,
    MachineInfo,
    ModelSpec,
    ServiceSpec,
    TensorSpec,
    Variant,
)

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
MACHINE = MachineInfo(
    hostname="bench-host",
    cpu_model="Test CPU @ 2.0GHz",
    logical_cpus=2,
    memory_gib=8.0,
    platform="Linux-test",
    python="3.11.7",
)


def variant(vid: str) -> Variant:
    model = ModelSpec(
        name="mlp", source="builtin", ref="mlp", inputs=(TensorSpec(name="x", shape=(None, 16)),)
    )
    return Variant(id=vid, model=model, format="onnx", artifacts={}, created_at=NOW)


def bench_result(
    vid: str,
    *,
    users: int,
    rps: float,
    p99: float,
    runtime: str = "onnxruntime",
    error_rate: float = 0.0,
    p50: float | None = None,
    samples_path: str = "missing.samples.csv",
    warmup_s: float = 1.0,
    load_model: str = "closed",
) -> BenchResult:
    """A hand-made load level: only the figures a test sets matter."""
    n = 1000
    n_errors = round(n * error_rate)
    p50 = p50 if p50 is not None else p99 / 2
    endpoint = Endpoint(
        service=ServiceSpec(variant=variant(vid), variant_dir="/nowhere", runtime=runtime),
        url="http://127.0.0.1:1",
    )
    load = LoadSpec(
        scenario="test",
        load_model="closed" if load_model == "closed" else "open",
        users=users,
        duration_s=10,
        warmup_s=warmup_s,
        rate_rps=None if load_model == "closed" else rps,
    )
    return BenchResult(
        variant_id=vid,
        runtime=runtime,
        precision="fp32",
        endpoint=endpoint,
        load=load,
        machine=MACHINE,
        started_at=NOW,
        measured_s=9.0,
        n_requests=n,
        n_errors=n_errors,
        error_rate=error_rate,
        throughput_rps=rps,
        latency_ms=LatencyStats(n=n - n_errors, mean=p50, p50=p50, p90=p99, p95=p99, p99=p99, max=p99 * 1.5),
        samples_path=samples_path,
    )


# Four levels of one variant: c=4 is the best within a 100 ms SLO; c=16 is faster but had errors.
LEVELS = [
    bench_result("m.onnx.a", users=1, rps=80.0, p99=20.0),
    bench_result("m.onnx.a", users=4, rps=150.0, p99=90.0),
    bench_result("m.onnx.a", users=8, rps=170.0, p99=140.0),
    bench_result("m.onnx.a", users=16, rps=200.0, p99=60.0, error_rate=0.01),
]


def test_formula_on_hand_computed_numbers() -> None:
    # $0.085/h, one replica, 100 req/s: 360,000 inferences an hour → 0.085 / 0.36 = $0.23611 per million.
    assert usd_per_million(0.085, 1, 100.0) == pytest.approx(0.2361111, rel=1e-6)
    # $0.34/h × 3 replicas = $1.02/h for 50 req/s = 180,000 an hour → $5.6667 per million.
    assert usd_per_million(0.34, 3, 50.0) == pytest.approx(5.6666667, rel=1e-6)
    with pytest.raises(ValueError):
        usd_per_million(0.085, 1, 0.0)


def test_slo_picks_the_fastest_level_that_meets_it_without_errors() -> None:
    assert best_at_slo(LEVELS, 100.0) is LEVELS[1]  # not c=8 (p99 140 ms), not c=16 (errors)
    assert best_at_slo(LEVELS, 150.0) is LEVELS[2]
    assert best_at_slo(LEVELS, 20.0) is LEVELS[0]  # p99 == SLO counts as meeting it
    assert best_at_slo(LEVELS, 10.0) is None
    price = packaged_prices().get("c6i.large")
    cost = cost_at_slo(LEVELS, "c6i.large", price, 100.0)
    assert cost is not None
    assert (cost.basis, cost.replicas, cost.throughput_rps, cost.slo_ms) == (
        "max-throughput-at-slo",
        1,
        150.0,
        100.0,
    )
    assert cost.price_per_hour == 0.085
    assert cost.usd_per_million == pytest.approx(0.085 / (150 * 3600) * 1e6)  # $0.15741
    assert cost.usd_per_million == pytest.approx(0.1574074, rel=1e-6)
    assert cost_at_slo(LEVELS, "c6i.large", price, 10.0) is None


def measured_with_replicas(level: BenchResult, replicas: int) -> BenchResult:
    service = level.endpoint.service.model_copy(update={"replicas": replicas})
    return level.model_copy(update={"endpoint": level.endpoint.model_copy(update={"service": service})})


def test_levels_measured_on_several_replicas_are_priced_per_replica() -> None:
    price = packaged_prices().get("c6i.large")
    # Two replicas served 150 req/s together: 75 each, both paid for.
    levels = [measured_with_replicas(level, 2) for level in LEVELS]
    cost = cost_at_slo(levels, "c6i.large", price, 100.0)
    assert cost is not None
    assert (cost.replicas, cost.throughput_rps) == (2, 75.0)
    assert cost.usd_per_million == pytest.approx(usd_per_million(0.085, 2, 150.0))
    assert cost.usd_per_million == pytest.approx(
        2 * cost_at_slo(LEVELS, "c6i.large", price, 100.0).usd_per_million
    )  # type: ignore[union-attr]
    # 400 req/s at 75 per replica: ceil(5.33) = 6 replicas.
    offered = cost_at_offered_load(levels, "c6i.large", price, 100.0, 400.0)
    assert offered is not None
    assert (offered.replicas, offered.throughput_rps) == (6, 75.0)
    assert offered.usd_per_million == pytest.approx(usd_per_million(0.085, 6, 400.0))


def test_offered_load_needs_whole_replicas() -> None:
    price = packaged_prices().get("c6i.large")
    # 400 req/s on replicas that sustain 150 each: ceil(2.67) = 3 replicas, $0.255/h for 1.44M an hour.
    cost = cost_at_offered_load(LEVELS, "c6i.large", price, 100.0, 400.0)
    assert cost is not None
    assert (cost.replicas, cost.offered_rps, cost.basis) == (3, 400.0, "offered-load")
    assert cost.usd_per_million == pytest.approx(0.1770833, rel=1e-6)
    exact = cost_at_offered_load(LEVELS, "c6i.large", price, 100.0, 150.0)
    assert exact is not None and exact.replicas == 1
    just_over = cost_at_offered_load(LEVELS, "c6i.large", price, 100.0, 150.1)
    assert just_over is not None and just_over.replicas == 2
    # a small load still pays for a whole replica: dearer per inference than running one flat out
    small = cost_at_offered_load(LEVELS, "c6i.large", price, 100.0, 15.0)
    assert small is not None and small.replicas == 1
    assert small.usd_per_million == pytest.approx(10 * usd_per_million(0.085, 1, 150.0))
    assert cost_at_offered_load(LEVELS, "c6i.large", price, 10.0, 400.0) is None
    with pytest.raises(ConfigError):
        cost_at_offered_load(LEVELS, "c6i.large", price, 100.0, 0.0)


def test_packaged_table_loads_and_every_entry_is_sane() -> None:
    table = load_prices(None)
    assert re.search(r"\b20\d\d-\d\d\b", table.note), "the note must date the prices"
    assert "check" in table.note.lower()
    expected = {
        "c6i.large",
        "c6i.xlarge",
        "c6i.2xlarge",
        "c7i.large",
        "m6i.large",
        "g4dn.xlarge",
        "g5.xlarge",
        "p3.2xlarge",
        "n2-standard-2",
        "n2-standard-4",
        "e2-standard-2",
        "g2-standard-4",
        "Standard_D2s_v5",
        "Standard_D4s_v5",
        "Standard_NC4as_T4_v3",
    }
    assert expected <= set(table.instances)
    for name, inst in table.instances.items():
        assert inst.provider in {"aws", "gcp", "azure"}, name
        assert inst.region, name
        assert 0.01 < inst.usd_per_hour < 50, name
        assert 1 <= inst.vcpu <= 192 and 1 <= inst.memory_gib <= 2048, name
        # memory per vCPU between 1 and 16 GiB: catches swapped columns
        assert 1 <= inst.memory_gib / inst.vcpu <= 16, name
        if inst.gpu is not None:
            assert inst.gpu.count >= 1 and inst.gpu.model, name
            # a GPU machine costs more than a CPU-only one with as many vCPUs
            cpu_peers = [
                i.usd_per_hour for i in table.instances.values() if i.gpu is None and i.vcpu == inst.vcpu
            ]
            assert all(inst.usd_per_hour > p for p in cpu_peers), name
    assert table.instances["c6i.large"].vcpu == 2 and table.instances["c6i.large"].gpu is None
    assert table.instances["g4dn.xlarge"].gpu is not None and "T4" in table.instances["g4dn.xlarge"].gpu.model


def test_default_instance_matches_the_cpu_count() -> None:
    table = packaged_prices()
    assert table.default_instance(2) == "c6i.large"
    assert table.default_instance(4) == "c6i.xlarge"
    assert table.default_instance(8) == "c6i.2xlarge"
    assert table.default_instance(3) == "c6i.xlarge"  # the next bigger one
    assert table.default_instance(512) == "c6i.2xlarge"  # the biggest there is
    for cpus in (2, 4, 8):
        assert table.instances[table.default_instance(cpus)].gpu is None


def test_an_override_file_adds_and_replaces_entries(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "note: our negotiated prices, 2026-11\n"
        "instances:\n"
        "  c6i.large: {provider: aws, region: us-east-1, usd_per_hour: 0.05, vcpu: 2, memory_gib: 4}\n"
        "  onprem-box:\n"
        "    provider: onprem\n"
        "    region: basement\n"
        "    usd_per_hour: 0.02\n"
        "    vcpu: 16\n"
        "    memory_gib: 64\n"
        "    gpu: {model: RTX 4090, count: 2}\n"
    )
    table = load_prices(path)
    packaged = packaged_prices()
    assert table.instances["c6i.large"].usd_per_hour == 0.05
    assert table.instances["onprem-box"].gpu is not None and table.instances["onprem-box"].gpu.count == 2
    assert set(table.instances) == set(packaged.instances) | {"onprem-box"}
    assert table.instances["g5.xlarge"] == packaged.instances["g5.xlarge"]
    assert "negotiated" in table.note
    costs = estimate_costs(LEVELS, table, "c6i.large", 100.0)
    assert costs[0].usd_per_million == pytest.approx(0.05 / (150 * 3600) * 1e6)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (
            "instances:\n  c6i.large: {provider: aws, region: r, usd_per_hour: -1, vcpu: 2, memory_gib: 4}\n",
            "instances.c6i.large.usd_per_hour",
        ),
        (
            "instances:\n  x1: {provider: aws, region: r, usd_per_hour: 1, vcpu: 2}\n",
            "instances.x1.memory_gib",
        ),
        (
            "instances:\n  x1: {provider: aws, region: r, usd_per_hour: 1, vcpu: 2, memory_gib: 4,\n"
            "       prise: 3}\n",
            "instances.x1.prise",
        ),
        ("instancez: {}\n", "instancez"),
        ("instances:\n  x1: {provider: aws, region: r, usd_per_hour: 1, vcpu: two, memory_gib: 4}\n", "vcpu"),
    ],
)
def test_a_bad_override_is_one_line_naming_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_prices(path)
    message = caught.value.one_line()
    assert key in message and str(path) in message
    assert "\n" not in message


def test_unreadable_override_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_prices(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("instances: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_prices(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- c6i.large\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_prices(listed)


def test_build_report_fills_costs() -> None:
    report = build_report(
        "mlp",
        {"m.onnx.a": variant("m.onnx.a")},
        LEVELS,
        [],
        instance="c6i.xlarge",
        slo_ms=100.0,
        offered_rps=400.0,
    )
    (row,) = report.rows
    by_basis = {c.basis: c for c in row.costs}
    assert set(by_basis) == {"max-throughput-at-slo", "offered-load"}
    assert by_basis["max-throughput-at-slo"].usd_per_million == pytest.approx(0.17 / (150 * 3600) * 1e6)
    assert by_basis["offered-load"].replicas == math.ceil(400 / 150)
    assert all(c.instance == "c6i.xlarge" for c in row.costs)
    # the default instance follows the benchmark machine's CPU count (2 → c6i.large)
    (default_row,) = build_report("mlp", {}, LEVELS, []).rows
    assert [c.instance for c in default_row.costs] == ["c6i.large"]
    # nothing met the SLO: no estimate, and the markdown says why
    (strict,) = build_report("mlp", {}, LEVELS, [], slo_ms=5.0).rows
    assert strict.costs == ()
    markdown = render_markdown(report)
    assert "$0.315 / 1M" in markdown and "c6i.xlarge" in markdown
    with pytest.raises(ConfigError, match=r"unknown instance type 'c9\.huge'"):
        build_report("mlp", {}, LEVELS, [], instance="c9.huge")
