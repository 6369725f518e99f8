"""The Scenario contract: a named load shape that drives a served variant level by level.

``levels()`` lists the load levels of fixed-shape scenarios; ``run(drive)`` drives them (``drive`` runs
one level and returns its BenchResult), and adaptive scenarios (the SLO search) override it to pick
the next level from the last result. ``from_load`` builds a scenario from the experiment's ``load:``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from optiserve.registry import Plugin
from optiserve.types import BenchResult, LoadSpec

if TYPE_CHECKING:
    from optiserve.config import LoadConfig

Drive = Callable[[LoadSpec], BenchResult]


class ScenarioConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OpenLoopSettings(ScenarioConfig):
    """What every open-loop scenario shares."""

    arrival: Literal["constant", "poisson"] = "poisson"
    """Evenly spaced sends, or exponential gaps (a Poisson process) at the same mean rate."""
    warmup_s: float = Field(default=2.0, ge=0)
    max_in_flight: int = Field(default=256, ge=1)
    """Connections the generator may open; a send with none free waits (and counts as late)."""

    def level(
        self, scenario: str, rate: float, duration_s: float, profile: tuple[tuple[float, float], ...] = ()
    ) -> LoadSpec:
        """One open-loop level at ``rate`` (the peak, with a profile)."""
        return LoadSpec(
            scenario=scenario,
            load_model="open",
            users=self.max_in_flight,
            duration_s=duration_s,
            warmup_s=self.warmup_s,
            rate_rps=round(rate, 2),
            arrival=self.arrival,
            profile=profile,
        )


class Scenario(Plugin, base=True, package="optiserve.loadtests.scenarios"):
    extra: ClassVar[str] = "load"
    requires: ClassVar[tuple[str, ...]] = ("locust",)
    load_model: ClassVar[str] = "closed"
    """``closed`` (N users, each waits for its answer) or ``open`` (requests sent on a schedule)."""

    user_class: ClassVar[str] = ""
    """The Locust user class in ``locustfile.py`` that drives this scenario (closed loops)."""

    Config: ClassVar[type[ScenarioConfig]] = ScenarioConfig

    def __init__(self, config: Any = None) -> None:
        self.config = config or self.Config()

    @classmethod
    def from_load(cls, load: LoadConfig) -> Self:
        """This scenario with the experiment's ``load:`` settings (only the keys it knows)."""
        fields = cls.Config.model_fields
        given = {k: v for k, v in load.model_dump().items() if k in fields and v is not None}
        return cls(cls.Config(**given))

    def levels(self) -> list[LoadSpec]:
        raise NotImplementedError

    def run(self, drive: Drive) -> list[BenchResult]:
        return [drive(level) for level in self.levels()]
