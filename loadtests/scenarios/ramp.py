"""Ramp: the open-loop rate climbs in equal steps from a start rate to a peak, in one continuous level.

Shows where latency starts to bend; the raw samples carry the scheduled send times, so the report can
plot latency against the offered rate at each moment."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from optiserve.types import LoadSpec

from .base import OpenLoopSettings, Scenario


class RampConfig(OpenLoopSettings):
    start_rate: float = Field(default=5.0, gt=0)
    peak_rate: float = Field(default=100.0, gt=0)
    steps: int = Field(default=5, ge=2, le=50)
    step_s: float = Field(default=4.0, gt=0)


class Ramp(Scenario):
    name: ClassVar[str] = "ramp"
    description: ClassVar[str] = "open-loop rate rising in steps from start_rate to peak_rate"
    load_model: ClassVar[str] = "open"
    requires: ClassVar[tuple[str, ...]] = ()
    Config = RampConfig
    config: RampConfig

    def levels(self) -> list[LoadSpec]:
        c = self.config
        step = (c.peak_rate - c.start_rate) / (c.steps - 1)
        profile = tuple((c.step_s, c.start_rate + k * step) for k in range(c.steps))
        return [c.level(self.name, c.peak_rate, c.step_s * c.steps, profile)]
