"""The Scenario contract: a named load shape that expands into labelled load levels."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from optiserve.registry import Plugin
from optiserve.types import LoadSpec


class ScenarioConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Scenario(Plugin, base=True, package="optiserve.loadtests.scenarios"):
    extra: ClassVar[str] = "load"
    requires: ClassVar[tuple[str, ...]] = ("locust",)
    load_model: ClassVar[str] = "closed"
    """``closed`` (N users, each waits for its answer) or ``open`` (requests sent on a schedule)."""

    user_class: ClassVar[str] = ""
    """The Locust user class in ``locustfile.py`` that drives this scenario."""

    def levels(self) -> list[LoadSpec]:
        raise NotImplementedError
