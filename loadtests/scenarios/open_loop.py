"""Open loop: requests sent at a fixed rate (evenly spaced or Poisson), swept over a list of rates."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from optiserve.types import LoadSpec

from .base import Scenario, ScenarioConfig


class OpenLoopConfig(ScenarioConfig):
    rates: tuple[float, ...] = Field(default=(10.0, 40.0), min_length=1)
    """Offered requests per second, one level each."""
    arrival: Literal["constant", "poisson"] = "poisson"
    duration_s: float = Field(default=12.0, gt=0)
    warmup_s: float = Field(default=3.0, ge=0)
    max_in_flight: int = Field(default=256, ge=1)
    """Connections the generator may open; a send with none free waits (and counts as late)."""


class OpenLoop(Scenario):
    name: ClassVar[str] = "open-loop"
    description: ClassVar[str] = "a fixed arrival rate (constant or Poisson), latency from the scheduled send"
    load_model: ClassVar[str] = "open"
    requires: ClassVar[tuple[str, ...]] = ()
    Config = OpenLoopConfig
    config: OpenLoopConfig

    def levels(self) -> list[LoadSpec]:
        return [
            LoadSpec(
                scenario=self.name,
                load_model="open",
                users=self.config.max_in_flight,
                duration_s=self.config.duration_s,
                warmup_s=self.config.warmup_s,
                rate_rps=rate,
                arrival=self.config.arrival,
            )
            for rate in self.config.rates
        ]
