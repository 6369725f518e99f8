"""The Optimizer contract: take a parent variant, write a new one.

An optimizer declares the artifact formats and precisions it accepts and a pydantic ``Config``
(unknown keys are refused). :meth:`Optimizer.apply` derives the child's id from the lineage, reuses
a verified variant with that id when one exists, and otherwise builds it in a staging directory that
only replaces the final one on success: a failed step leaves nothing half-written.

What an optimizer needs besides its parent (calibration samples, training data, threads) comes from
the :class:`OptimizeContext`, so every optimizer sees the same data for the same experiment.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from optiserve.errors import ArtifactError, ConfigError
from optiserve.fsutil import staging_dir
from optiserve.hardware import int8_cpu_features
from optiserve.ids import variant_id
from optiserve.manifest import describe_artifact, load_variant, variant_dir, write_variant
from optiserve.registry import Plugin
from optiserve.types import ArtifactFormat, ModelSpec, OptimizerStep, Precision, Variant

if TYPE_CHECKING:
    import numpy as np

    from optiserve.userdata import Preprocess


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def first_and_last(names: list[str], first: int, last: int) -> list[str]:
    """The first ``first`` and the last ``last`` of ``names`` (in order, each once): the layers a
    quantizer's ``keep_first`` / ``keep_last`` options keep in float."""
    return list(dict.fromkeys(names[:first] + (names[len(names) - last :] if last else [])))


@dataclass(frozen=True)
class Produced:
    """What :meth:`Optimizer.produce` wrote into the staging directory."""

    format: ArtifactFormat
    precision: Precision
    artifacts: dict[str, str]  # name -> path relative to the variant directory
    parameters: int | None = None


@dataclass
class OptimizeContext:
    """Shared inputs of one optimize stage. Data sets are loaded once and reused by every optimizer."""

    workdir: Path
    calibration_samples: int = 300
    calibration_path: Path | None = None
    """An .npy file of preprocessed samples to calibrate on, instead of the model's own split."""
    calibration_data: Path | None = None
    """The user's calibration set (an image folder, .csv/.jsonl or .npz; see optiserve.userdata)."""
    preprocess: Preprocess | None = None
    """How images become an ONNX image model's input (``model.preprocess``)."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def calibration(self, spec: ModelSpec) -> np.ndarray:
        """Calibration samples; an empty or mis-shaped set is a ConfigError (raised before any work)."""
        key = f"calibration:{spec.name}"
        if key not in self._cache:
            self._cache[key] = self._load_calibration(spec)
        return self._cache[key]  # type: ignore[no-any-return]

    def _load_calibration(self, spec: ModelSpec) -> np.ndarray:
        import numpy as np

        from optiserve.models.resolve import dataset

        if self.calibration_data is not None:
            from optiserve.userdata import load

            data = load(
                self.calibration_data, spec, what="calibration.data", preprocess=self.preprocess
            ).inputs
        elif self.calibration_path is None:
            data, _ = dataset(spec, "calibration", self.calibration_samples)
        else:
            try:
                data = np.load(self.calibration_path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"calibration file {self.calibration_path}: cannot read it as .npy ({e})"
                ) from e
        inp = spec.inputs[0]
        if data.ndim == 0 or len(data) == 0:
            raise ConfigError(
                f"the calibration set is empty ({self.calibration_path or 'calibration.samples'}): "
                f"quantizers need at least one sample of shape {inp.describe()}"
            )
        if not inp.matches(tuple(data.shape[1:])):
            raise ConfigError(
                f"calibration samples have shape {tuple(data.shape[1:])}, the model takes {inp.describe()}"
            )
        return np.ascontiguousarray(data[: self.calibration_samples], dtype=spec.inputs[0].dtype)

    def calibration_digest(self, spec: ModelSpec) -> str:
        """sha256 (16 hex digits) of the calibration samples: their shape, dtype and bytes."""
        import hashlib

        data = self.calibration(spec)
        h = hashlib.sha256(f"{data.shape} {data.dtype}".encode())
        h.update(data.tobytes())
        return h.hexdigest()[:16]

    def training(self, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray] | None:
        key = f"training:{spec.name}"
        if key not in self._cache:
            from optiserve.models.resolve import training_data

            self._cache[key] = training_data(spec)
        return self._cache[key]  # type: ignore[no-any-return]


class Optimizer(Plugin, base=True, package="optiserve.optimizers"):
    tag: ClassVar[str] = ""
    """The readable part of child ids, e.g. ``onnx`` → ``efficientnet-lite0.onnx.3fa2c1``."""

    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ()
    """Parent formats this optimizer can work from."""

    output_format: ClassVar[ArtifactFormat | None] = None
    """The format of the variants it writes (lets tests and plans find a chain to a needed format)."""

    input_precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    """Parent precisions it can work from (quantizing an already quantized variant makes no sense)."""

    lossy: ClassVar[bool] = False
    """False for transforms that keep outputs equal up to float rounding (export, graph fusion)."""

    needs_calibration: ClassVar[bool] = False
    """Reads ``ctx.calibration(...)``: the calibration set is checked before any optimizer runs."""

    needs_training_data: ClassVar[bool] = False
    """Trains (fine-tuning, QAT, distillation): skipped with the reason for models without training data."""

    Config: ClassVar[type[OptimizerConfig]] = OptimizerConfig

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        try:
            self.config = self.Config.model_validate(config or {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"optimizer {self.name}: {where}: {first['msg']}") from e

    def accepts(self, parent: Variant) -> bool:
        return (
            parent.format in self.input_formats
            and parent.precision in self.input_precisions
            and all(step.optimizer != self.name for step in parent.steps)
        )

    def step(self) -> OptimizerStep:
        return OptimizerStep(optimizer=self.name, tag=self.tag, config=self.config.model_dump(mode="json"))

    def child_id(self, parent: Variant, ctx: OptimizeContext | None = None) -> str:
        """Content-derived: the parent, the optimizer and its config and, for an optimizer that
        calibrates, a digest of the calibration data (so a run calibrated on other samples, e.g.
        ``--quick``'s fewer ones, never reuses a stale variant)."""
        step = self.step()
        tags = [s.tag for s in (*parent.steps, step)] or [parent.format]
        lineage: dict[str, Any] = {"parent": parent.id, "optimizer": step.optimizer, "config": step.config}
        if self.needs_calibration and ctx is not None:
            lineage["calibration"] = ctx.calibration_digest(parent.model)
        return variant_id(parent.model.name, tags, lineage)

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        raise NotImplementedError

    def apply(self, parent: Variant, workdir: Path, ctx: OptimizeContext | None = None) -> Variant:
        self.require_available()
        ctx = ctx or OptimizeContext(workdir)
        child_id = self.child_id(parent, ctx)
        final = variant_dir(workdir, child_id)
        if final.exists():
            try:
                return load_variant(final)
            except ArtifactError:
                pass  # stale or corrupted: rebuild it below
        parent_dir = variant_dir(workdir, parent.id)
        with staging_dir(final) as out:
            produced = self.produce(parent, parent_dir, out, ctx)
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
                cpu_features=parent.cpu_features
                if parent.cpu_features is not None
                else (int8_cpu_features() if produced.precision == "int8" else None),
            )
            write_variant(out, child)
        return child


class TorchTransform(Optimizer):
    """Base of the optimizers that turn a torch model into another torch model (pruning, low-rank,
    distillation): lossy, and served by torch or exported afterwards. Not registered itself (no name)."""

    requires: ClassVar[tuple[str, ...]] = ("torch",)
    extra: ClassVar[str] = "models"
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)
    output_format: ClassVar[ArtifactFormat | None] = "torch"
    lossy: ClassVar[bool] = True
