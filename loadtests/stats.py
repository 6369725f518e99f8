"""Statistics from raw per-request samples: the warm-up is cut, the rest is measured."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optiserve.types import LatencyStats


@dataclass(frozen=True)
class Samples:
    start_s: np.ndarray
    latency_ms: np.ndarray
    ok: np.ndarray
    error: list[str]

    def __len__(self) -> int:
        return len(self.start_s)


def read_samples(path: Path) -> Samples:
    starts: list[float] = []
    lats: list[float] = []
    oks: list[bool] = []
    errors: list[str] = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            starts.append(float(row["start_s"]))
            lats.append(float(row["latency_ms"]))
            oks.append(row["ok"] == "1")
            errors.append(row["error"])
    return Samples(np.asarray(starts), np.asarray(lats), np.asarray(oks, dtype=bool), errors)


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
