"""Open loop: requests sent at a fixed rate (evenly spaced or Poisson), swept over a list of rates."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from optiserve.types import LoadSpec

from .base import OpenLoopSettings, Scenario


class OpenLoopConfig(OpenLoopSettings):
    rates: tuple[float, ...] = Field(default=(10.0, 40.0), min_length=1)
    """Offered requests per second, one level each."""
    duration_s: float = Field(default=12.0, gt=0)
    warmup_s: float = Field(default=3.0, ge=0)


class OpenLoop(Scenario):
    name: ClassVar[str] = "open-loop"
    description: ClassVar[str] = "a fixed arrival rate (constant or Poisson), latency from the scheduled send"
    load_model: ClassVar[str] = "open"
    requires: ClassVar[tuple[str, ...]] = ()
    Config = OpenLoopConfig
    config: OpenLoopConfig

    def levels(self) -> list[LoadSpec]:
        return [self.config.level(self.name, rate, self.config.duration_s) for rate in self.config.rates]
