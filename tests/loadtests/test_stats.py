"""Statistics from raw samples: the warm-up is cut, percentiles are over what remains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optiserve.loadtests.stats import (
    Samples,
    Window,
    bootstrap_percentile_ci,
    latency_stats,
    measured_window,
    read_samples,
    stability,
    throughput_ci,
)


def write_samples(path: Path, rows: list[tuple[float, float, int, str]]) -> Path:
    lines = ["start_s,latency_ms,ok,error", *(f"{s},{lat},{ok},{err}" for s, lat, ok, err in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def samples_csv(tmp_path: Path) -> Path:
    """Requests at t = 100.0 … 104.5 every 0.5 s, 100 ms each; two failures, one in the warm-up."""
    rows = [(100.0 + i * 0.5, 100.0, 1, "") for i in range(10)]
    rows[1] = (100.5, 100.0, 0, "http-500")  # in the first second
    rows[6] = (103.0, 250.0, 0, "http-503")
    return write_samples(tmp_path / "samples.csv", rows)


def test_read_samples(samples_csv: Path) -> None:
    samples = read_samples(samples_csv)
    assert len(samples) == 10
    assert samples.ok.dtype == bool
    assert int(samples.ok.sum()) == 8
    assert samples.error[1] == "http-500"


def test_measured_window_drops_the_warm_up(samples_csv: Path) -> None:
    window = measured_window(read_samples(samples_csv), warmup_s=1.0)
    assert window.samples.start_s.min() == pytest.approx(101.0)  # 100.0 and 100.5 are warm-up
    assert len(window.samples) == 8
    assert window.n_errors == 1
    assert window.errors_by_kind() == {"http-503": 1}
    # from the end of the warm-up (101.0) to the last answer (104.5 + 0.1)
    assert window.seconds == pytest.approx(3.6)
    assert window.throughput == pytest.approx(7 / 3.6)


def test_measured_window_without_warm_up_keeps_everything(samples_csv: Path) -> None:
    window = measured_window(read_samples(samples_csv), warmup_s=0.0)
    assert len(window.samples) == 10
    assert window.errors_by_kind() == {"http-500": 1, "http-503": 1}


def test_measured_window_of_a_warm_up_only_run_is_empty(samples_csv: Path, tmp_path: Path) -> None:
    window = measured_window(read_samples(samples_csv), warmup_s=60.0)
    assert len(window.samples) == 0
    assert window.throughput == 0.0
    empty = measured_window(read_samples(write_samples(tmp_path / "none.csv", [])), warmup_s=1.0)
    assert len(empty.samples) == 0 and empty.seconds == 0.0


def test_latency_stats_percentiles_on_known_data() -> None:
    stats = latency_stats(np.arange(1, 101, dtype=float))  # 1 … 100 ms
    assert stats is not None
    assert stats.n == 100
    assert stats.mean == pytest.approx(50.5)
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p95 == pytest.approx(95.05)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.max == 100.0
    assert stats.p50 <= stats.p90 <= stats.p95 <= stats.p99 <= stats.max


def test_latency_stats_of_nothing_is_none() -> None:
    assert latency_stats(np.array([])) is None


def synthetic_window(
    rates: list[float], p50s: list[float], seconds_each: float = 4.0, seed: int = 1
) -> Window:
    """Requests at the given rate and latency level in consecutive equal periods."""
    rng = np.random.default_rng(seed)
    starts, lats = [], []
    t = 1000.0
    for rate, p50 in zip(rates, p50s, strict=True):
        n = int(rate * seconds_each)
        starts.append(t + np.sort(rng.uniform(0, seconds_each, n)))
        lats.append(rng.lognormal(np.log(p50), 0.05, n))
        t += seconds_each
    s = np.concatenate(starts)
    lat = np.concatenate(lats)
    samples = Samples(s, lat, np.ones(len(s), dtype=bool), [""] * len(s))
    return Window(samples, seconds_each * len(rates))


def test_bootstrap_interval_covers_the_true_percentile() -> None:
    values = np.random.default_rng(0).lognormal(np.log(10), 0.3, 5000)
    ci = bootstrap_percentile_ci(values, 99)
    true_p99 = float(np.exp(np.log(10) + 0.3 * 2.3263))
    assert ci is not None and ci.low < true_p99 < ci.high
    assert ci.high - ci.low < 0.15 * true_p99
    assert bootstrap_percentile_ci(values[:10], 50) is None  # too few to say


def test_a_steady_level_is_stable_and_a_step_is_not() -> None:
    assert stability(synthetic_window([100, 100, 100], [10, 10, 10]))[0] is True
    assert stability(synthetic_window([100, 100, 160], [10, 10, 10]))[0] is False  # throughput jumped
    assert stability(synthetic_window([100, 100, 100], [10, 10, 20]))[0] is False  # p99 doubled
    assert stability(synthetic_window([2, 2, 2], [10, 10, 10]))[0] is None  # too few answers per third


def test_throughput_interval_contains_the_rate() -> None:
    window = synthetic_window([100] * 3, [10] * 3)
    ci = throughput_ci(window)
    assert ci is not None and ci.low <= window.throughput <= ci.high
    assert ci.low > 90 and ci.high < 110


def test_throughput_interval_is_about_the_reported_figure_when_the_window_ends_mid_second() -> None:
    """Sends over 11 s, the window ending with the last answer 0.86 s later (as real levels do): the
    interval must be about the reported figure (answers ÷ window), not about the sends per whole second."""
    sends = synthetic_window([400] * 3, [90] * 3, seconds_each=11.0 / 3)
    window = Window(sends.samples, 11.86)
    ci = throughput_ci(window)
    assert ci is not None and ci.low <= window.throughput <= ci.high, (ci, window.throughput)
