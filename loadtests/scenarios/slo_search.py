"""The highest open-loop rate whose p99 meets an SLO: a binary search on the rate (MLPerf's Server
scenario). A rate passes when p99 <= slo_ms, no request failed and the generator kept up."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from optiserve.types import BenchResult, LoadSpec

from .base import Drive, OpenLoopSettings, Scenario


class SloSearchConfig(OpenLoopSettings):
    slo_ms: float = Field(default=100.0, gt=0)
    """The p99 latency bound."""
    min_rate: float = Field(default=1.0, gt=0)
    max_rate: float = Field(default=2000.0, gt=0)
    steps: int = Field(default=6, ge=1, le=20)
    """Search levels after the first: the bracket halves each time."""
    duration_s: float = Field(default=10.0, gt=0)


def meets_slo(result: BenchResult, slo_ms: float) -> bool:
    trusted = not any("generator" in f or "late" in f for f in result.integrity.flags)
    return (
        result.n_errors == 0 and result.latency_ms is not None and result.latency_ms.p99 <= slo_ms and trusted
    )


class SloSearch(Scenario):
    name: ClassVar[str] = "slo-search"
    description: ClassVar[str] = "binary search for the highest rate with p99 under the SLO (MLPerf Server)"
    load_model: ClassVar[str] = "open"
    requires: ClassVar[tuple[str, ...]] = ()
    Config = SloSearchConfig
    config: SloSearchConfig

    def level(self, rate: float) -> LoadSpec:
        return self.config.level(self.name, rate, self.config.duration_s)

    def levels(self) -> list[LoadSpec]:
        return [self.level(self.config.min_rate)]

    def run(self, drive: Drive) -> list[BenchResult]:
        """Double the rate while it passes, then bisect (geometrically) between the last pass and fail."""
        c = self.config
        first = drive(self.level(c.min_rate))
        results = [first]
        if not meets_slo(first, c.slo_ms):
            return results  # even the lowest rate misses the SLO
        low, high = c.min_rate, None
        rate = min(c.max_rate, max(2 * low, 1.5 * first.throughput_rps))
        for _ in range(c.steps):
            result = drive(self.level(rate))
            results.append(result)
            if meets_slo(result, c.slo_ms):
                low = rate
            else:
                high = rate
            if high is None:
                if rate >= c.max_rate:
                    break
                rate = min(c.max_rate, rate * 2)
            else:
                if high / low < 1.1:
                    break
                rate = (low * high) ** 0.5
        return results


def best_rate(results: list[BenchResult], slo_ms: float) -> BenchResult | None:
    """The passing level with the highest throughput, or None."""
    passing = [r for r in results if meets_slo(r, slo_ms)]
    return max(passing, key=lambda r: r.throughput_rps, default=None)
