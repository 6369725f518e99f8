"""The Optimizer contract: take a parent variant, write a new one.

An optimizer declares the artifact formats it accepts and a pydantic ``Config`` (unknown keys are
refused). :meth:`Optimizer.apply` derives the child's id from the lineage, reuses a verified variant
with that id when one exists, and otherwise builds it in a staging directory that only replaces the
final one on success: a failed step leaves nothing half-written.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from optiserve.errors import ArtifactError, ConfigError
from optiserve.fsutil import staging_dir
from optiserve.ids import variant_id
from optiserve.manifest import describe_artifact, load_variant, variant_dir, write_variant
from optiserve.registry import Plugin
from optiserve.types import ArtifactFormat, OptimizerStep, Precision, Variant


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Produced:
    """What :meth:`Optimizer.produce` wrote into the staging directory."""

    format: ArtifactFormat
    precision: Precision
    artifacts: dict[str, str]  # name -> path relative to the variant directory
    parameters: int | None = None


class Optimizer(Plugin, base=True, package="optiserve.optimizers"):
    tag: ClassVar[str] = ""
    """The readable part of child ids, e.g. ``onnx`` → ``efficientnet-lite0.onnx.3fa2c1``."""

    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ()
    """Parent formats this optimizer can work from."""

    Config: ClassVar[type[OptimizerConfig]] = OptimizerConfig

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        try:
            self.config = self.Config.model_validate(config or {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"optimizer {self.name}: {where}: {first['msg']}") from e

    def accepts(self, parent: Variant) -> bool:
        return parent.format in self.input_formats

    def step(self) -> OptimizerStep:
        return OptimizerStep(optimizer=self.name, tag=self.tag, config=self.config.model_dump(mode="json"))

    def child_id(self, parent: Variant) -> str:
        step = self.step()
        tags = [s.tag for s in (*parent.steps, step)] or [parent.format]
        lineage = {"parent": parent.id, "optimizer": step.optimizer, "config": step.config}
        return variant_id(parent.model.name, tags, lineage)

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path) -> Produced:
        raise NotImplementedError

    def apply(self, parent: Variant, workdir: Path) -> Variant:
        self.require_available()
        child_id = self.child_id(parent)
        final = variant_dir(workdir, child_id)
        if final.exists():
            try:
                return load_variant(final)
            except ArtifactError:
                pass  # stale or corrupted: rebuild it below
        parent_dir = variant_dir(workdir, parent.id)
        with staging_dir(final) as out:
            produced = self.produce(parent, parent_dir, out)
            child = Variant(
                id=child_id,
                model=parent.model,
                parent_id=parent.id,
                steps=(*parent.steps, self.step()),
                format=produced.format,
                precision=produced.precision,
                artifacts={name: describe_artifact(out, rel) for name, rel in produced.artifacts.items()},
                parameters=produced.parameters if produced.parameters is not None else parent.parameters,
                created_at=dt.datetime.now(dt.UTC),
            )
            write_variant(out, child)
        return child
