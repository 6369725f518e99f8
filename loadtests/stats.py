"""Statistics from raw per-request samples: the warm-up is cut, the rest is measured."""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optiserve.types import ErrorWindow, Interval, LatencyStats


@dataclass(frozen=True)
class Samples:
    start_s: np.ndarray
    """Closed loop: when the request was sent. Open loop: when it was scheduled to be sent."""
    latency_ms: np.ndarray
    ok: np.ndarray
    error: list[str]
    late_ms: np.ndarray | None = None
    """Open loop: how long after its scheduled time each request actually left."""

    def __len__(self) -> int:
        return len(self.start_s)


def read_samples(path: Path) -> Samples:
    starts: list[float] = []
    lats: list[float] = []
    oks: list[bool] = []
    errors: list[str] = []
    late: list[float] = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            starts.append(float(row["start_s"]))
            lats.append(float(row["latency_ms"]))
            oks.append(row["ok"] == "1")
            errors.append(row["error"])
            if "late_ms" in row:
                late.append(float(row["late_ms"]))
    late_ms = np.asarray(late) if len(late) == len(starts) and late else None
    return Samples(np.asarray(starts), np.asarray(lats), np.asarray(oks, dtype=bool), errors, late_ms)


@dataclass(frozen=True)
class Window:
    """The measured part of a run: requests that started after the warm-up."""

    samples: Samples
    seconds: float

    @property
    def n_ok(self) -> int:
        return int(self.samples.ok.sum())

    @property
    def n_errors(self) -> int:
        return len(self.samples) - self.n_ok

    @property
    def throughput(self) -> float:
        return self.n_ok / self.seconds if self.seconds > 0 else 0.0

    def errors_by_kind(self) -> dict[str, int]:
        return dict(Counter(e for e, ok in zip(self.samples.error, self.samples.ok, strict=True) if not ok))


def measured_window(samples: Samples, warmup_s: float) -> Window:
    """Drop requests that started in the first ``warmup_s`` seconds; the window ends at the last answer."""
    if len(samples) == 0:
        return Window(samples, 0.0)
    t0 = float(samples.start_s.min()) + warmup_s
    keep = samples.start_s >= t0
    kept = Samples(
        samples.start_s[keep],
        samples.latency_ms[keep],
        samples.ok[keep],
        [e for e, k in zip(samples.error, keep, strict=True) if k],
        samples.late_ms[keep] if samples.late_ms is not None else None,
    )
    if len(kept) == 0:
        return Window(kept, 0.0)
    end = float((kept.start_s + kept.latency_ms / 1000.0).max())
    return Window(kept, max(end - t0, 1e-9))


def latency_stats(latency_ms: np.ndarray) -> LatencyStats | None:
    if latency_ms.size == 0:
        return None
    p50, p90, p95, p99 = np.percentile(latency_ms, [50, 90, 95, 99])
    return LatencyStats(
        n=int(latency_ms.size),
        mean=float(latency_ms.mean()),
        p50=float(p50),
        p90=float(p90),
        p95=float(p95),
        p99=float(p99),
        max=float(latency_ms.max()),
    )


ERROR_GAP_S = 1.0
"""Failed requests less than this apart (by send time) belong to one error window."""


def error_windows(window: Window, gap_s: float = ERROR_GAP_S) -> list[ErrorWindow]:
    """The stretches of failed requests in ``window``, each with how long the service took to answer
    successfully again (first failure → first success sent after the stretch's last failure)."""
    samples = window.samples
    if len(samples) == 0 or samples.ok.all():
        return []
    order = np.argsort(samples.start_s, kind="stable")
    start = samples.start_s[order]
    done = start + samples.latency_ms[order] / 1000.0
    ok = samples.ok[order]
    t0 = float(start.min())
    failed = np.flatnonzero(~ok)
    groups = np.split(failed, np.flatnonzero(np.diff(start[failed]) > gap_s) + 1)
    found = []
    for group in groups:
        first, last = int(group[0]), int(group[-1])
        later = np.flatnonzero(ok[last + 1 :])
        recovered = float(done[last + 1 + later[0]] - start[first]) if later.size else None
        found.append(
            ErrorWindow(
                start_s=float(start[first] - t0),
                end_s=float(done[group].max() - t0),
                n_errors=len(group),
                recovered_after_s=recovered,
            )
        )
    return found


def describe_error_window(w: ErrorWindow) -> str:
    again = (
        f"answering again {w.recovered_after_s:.1f} s after the first failure"
        if w.recovered_after_s is not None
        else "not answering again by the level's end"
    )
    return f"{w.n_errors} failed requests from {w.start_s:.1f} s to {w.end_s:.1f} s into the level; {again}"


BOOTSTRAP_RESAMPLES = 1000
STABILITY_TOLERANCE = 0.10
STABILITY_WINDOWS = 3


def bootstrap_percentile_ci(
    values: np.ndarray, q: float, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Interval | None:
    """95% percentile-bootstrap interval of the ``q``-th percentile (None below 20 values)."""
    if values.size < 20:
        return None
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for i in range(resamples):
        stats[i] = np.percentile(values[rng.integers(0, values.size, values.size)], q)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Interval(low=float(low), high=float(high))


def throughput_ci(window: Window, bin_s: float = 1.0, seed: int = 0) -> Interval | None:
    """95% bootstrap interval of throughput, resampling whole seconds (requests within a second are
    not independent); None for windows shorter than 5 bins.

    Only whole bins are resampled (a last partial second would count as a full one), and the spread is
    applied to the window's own throughput, so the interval is about the figure the report shows.
    """
    ok_starts = window.samples.start_s[window.samples.ok]
    if window.seconds < 5 * bin_s or ok_starts.size == 0:
        return None
    t0 = float(window.samples.start_s.min())
    bins = int(window.seconds // bin_s)
    index = ((ok_starts - t0) // bin_s).astype(int)
    counts = np.bincount(index[index < bins], minlength=bins)[:bins]
    if counts.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    ratios = counts[rng.integers(0, bins, (BOOTSTRAP_RESAMPLES, bins))].mean(axis=1) / counts.mean()
    low, high = np.percentile(ratios * window.throughput, [2.5, 97.5])
    return Interval(low=float(low), high=float(high))


def stability(window: Window, windows: int = STABILITY_WINDOWS) -> tuple[bool | None, int]:
    """(stable, windows): the measured window cut into ``windows`` equal parts; stable when throughput
    and p99 of every part lie within 10% of their mean. None when a part has fewer than 20 answers."""
    s = window.samples
    if len(s) == 0 or window.seconds <= 0:
        return None, 0
    t0 = float(s.start_s.min())
    edges = t0 + np.linspace(0, window.seconds, windows + 1)
    rates, p99s = [], []
    for lo, hi in itertools.pairwise(edges):
        part = (s.start_s >= lo) & (s.start_s < hi) & s.ok
        if part.sum() < 20:
            return None, windows
        rates.append(part.sum() / (hi - lo))
        p99s.append(float(np.percentile(s.latency_ms[part], 99)))
    ok = all(_within(values, STABILITY_TOLERANCE) for values in (rates, p99s))
    return ok, windows


def _within(values: list[float], tolerance: float) -> bool:
    mean = float(np.mean(values))
    return mean > 0 and max(abs(v - mean) for v in values) <= tolerance * mean


def late_fraction(window: Window, late_ms: float = 1.0) -> float | None:
    if window.samples.late_ms is None or len(window.samples) == 0:
        return None
    return float((window.samples.late_ms > late_ms).mean())
