"""Spike: a steady open-loop base rate, a burst at spike_rate, then the base rate again.

Shows how long the queue built during the burst takes to drain (the latency of requests scheduled
after the spike), which closed-loop load cannot show."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from optiserve.types import LoadSpec

from .base import OpenLoopSettings, Scenario


class SpikeConfig(OpenLoopSettings):
    base_rate: float = Field(default=10.0, gt=0)
    spike_rate: float = Field(default=100.0, gt=0)
    before_s: float = Field(default=4.0, gt=0)
    spike_s: float = Field(default=2.0, gt=0)
    after_s: float = Field(default=6.0, gt=0)


class Spike(Scenario):
    name: ClassVar[str] = "spike"
    description: ClassVar[str] = "base rate, a burst at spike_rate, base rate again (open loop)"
    load_model: ClassVar[str] = "open"
    requires: ClassVar[tuple[str, ...]] = ()
    Config = SpikeConfig
    config: SpikeConfig

    def levels(self) -> list[LoadSpec]:
        c = self.config
        profile = ((c.before_s, c.base_rate), (c.spike_s, c.spike_rate), (c.after_s, c.base_rate))
        return [c.level(self.name, c.spike_rate, c.before_s + c.spike_s + c.after_s, profile)]
