"""Every registered scenario: its levels, its config keys, and the SLO search's decisions."""

from __future__ import annotations

import datetime as dt

import pytest

from optiserve.config import ExperimentConfig, LoadConfig, parse_config
from optiserve.errors import ConfigError
from optiserve.hardware import machine_info
from optiserve.loadtests.scenarios.base import Scenario
from optiserve.loadtests.scenarios.slo_search import SloSearch, SloSearchConfig, best_rate
from optiserve.pipeline import scenario_from_config
from optiserve.types import (
    BenchResult,
    Endpoint,
    LatencyStats,
    LoadSpec,
    ModelSpec,
    ServiceSpec,
    TensorSpec,
    Variant,
)


@pytest.mark.parametrize("name", sorted(Scenario.registry()))
def test_every_scenario_builds_labelled_levels_from_the_load_config(name: str) -> None:
    scenario = Scenario.get(name).from_load(LoadConfig(scenario=name))
    levels = scenario.levels()
    assert levels
    for level in levels:
        assert level.scenario == name
        assert level.load_model == scenario.load_model
        if level.load_model == "open":
            assert level.rate_rps is not None and level.rate_rps > 0


def test_load_settings_reach_the_scenario() -> None:
    cfg = parse_config({"load": {"scenario": "open-loop", "rates": [5, 15], "arrival": "constant"}}, "test")
    levels = scenario_from_config(cfg).levels()
    assert [lv.rate_rps for lv in levels] == [5, 15]
    assert {lv.arrival for lv in levels} == {"constant"}


def test_a_misspelt_scenario_option_is_a_config_error_naming_the_allowed_ones() -> None:
    cfg = parse_config({"load": {"scenario": "spike", "scenario_options": {"spike_rat": 9}}}, "test")
    with pytest.raises(ConfigError, match=r"spike_rat.*spike_rate"):
        scenario_from_config(cfg)


def test_ramp_and_spike_profiles() -> None:
    (ramp,) = Scenario.get("ramp").from_load(LoadConfig(scenario="ramp")).levels()
    rates = [r for _, r in ramp.profile]
    assert rates == sorted(rates) and rates[0] < rates[-1] == ramp.rate_rps
    (spike,) = Scenario.get("spike").from_load(LoadConfig(scenario="spike")).levels()
    assert [r for _, r in spike.profile][1] == max(r for _, r in spike.profile)


def fake_result(load: LoadSpec, p99_ms: float) -> BenchResult:
    """A BenchResult as run_level would build it, for a server whose p99 grows with the rate."""
    spec = ModelSpec(name="m", source="onnx", ref="m.onnx", inputs=(TensorSpec(name="x", shape=(None, 1)),))
    variant = Variant(
        id="m.onnx.abc",
        model=spec,
        format="onnx",
        precision="fp32",
        artifacts={},
        created_at=dt.datetime.now(dt.UTC),
    )
    endpoint = Endpoint(
        service=ServiceSpec(variant=variant, variant_dir="/x", runtime="onnxruntime"), url="http://x"
    )
    stats = LatencyStats(
        n=100, mean=p99_ms / 2, p50=p99_ms / 2, p90=p99_ms, p95=p99_ms, p99=p99_ms, max=p99_ms
    )
    return BenchResult(
        variant_id=variant.id,
        runtime="onnxruntime",
        precision="fp32",
        endpoint=endpoint,
        load=load,
        machine=machine_info(),
        started_at=dt.datetime.now(dt.UTC),
        measured_s=10,
        n_requests=100,
        n_errors=0,
        error_rate=0.0,
        throughput_rps=load.rate_rps or 0,
        latency_ms=stats,
        samples_path="/dev/null",
    )


def test_slo_search_finds_the_knee_within_ten_percent() -> None:
    """Server model: p99 = 10 ms below 300 req/s, then it grows steeply (M/D/1-like)."""
    knee = 300.0
    tried: list[float] = []

    def drive(load: LoadSpec) -> BenchResult:
        assert load.rate_rps is not None
        tried.append(load.rate_rps)
        p99 = 10.0 if load.rate_rps < knee else 10.0 + (load.rate_rps - knee) * 5
        return fake_result(load, p99)

    search = SloSearch(SloSearchConfig(slo_ms=50.0, min_rate=1.0, max_rate=5000.0, steps=12))
    results = search.run(drive)
    best = best_rate(results, 50.0)
    assert best is not None
    assert 0.9 * 308 <= best.throughput_rps <= 308  # 308 req/s gives p99 = 50 ms
    assert len(tried) <= 13


def test_slo_search_stops_when_even_the_lowest_rate_fails() -> None:
    search = SloSearch(SloSearchConfig(slo_ms=5.0, min_rate=1.0))
    results = search.run(lambda load: fake_result(load, 50.0))
    assert len(results) == 1 and best_rate(results, 5.0) is None


def test_experiment_default_is_the_closed_loop() -> None:
    assert ExperimentConfig().load.scenario == "closed-loop"
