"""Closed loop: N concurrent users, each sending its next request as soon as the last one returns."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from optiserve.types import LoadSpec

from .base import Scenario, ScenarioConfig


class ClosedLoopConfig(ScenarioConfig):
    concurrency: tuple[int, ...] = Field(default=(1, 4), min_length=1)
    """The sweep: one load level per entry, in this order."""
    duration_s: float = Field(default=12.0, gt=0)
    """Measured seconds per level, after warm-up."""
    warmup_s: float = Field(default=3.0, ge=0)
    """Seconds at the start of each level whose samples are discarded."""


class ClosedLoop(Scenario):
    name: ClassVar[str] = "closed-loop"
    description: ClassVar[str] = "N concurrent users with no think time, swept over a list of N (Locust)"
    load_model: ClassVar[str] = "closed"
    user_class: ClassVar[str] = "ClosedLoopUser"
    Config = ClosedLoopConfig
    config: ClosedLoopConfig

    def levels(self) -> list[LoadSpec]:
        return [
            LoadSpec(
                scenario=self.name,
                load_model="closed",
                users=n,
                duration_s=self.config.duration_s,
                warmup_s=self.config.warmup_s,
            )
            for n in self.config.concurrency
        ]
