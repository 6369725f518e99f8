"""NNCF INT8 quantization with accuracy control (``nncf-int8-ac``): quantize, then put the most
harmful quantized ops back in floating point until the metric drop is within ``max_drop``.

Validation data (why not the eval split): the accuracy gate measures every variant on the model's
held-out eval split, so tuning on it would leak the gate's data into the variant and overstate its
accuracy. The validation set here is therefore carved out of the *calibration* samples
(``ctx.calibration(...)``): the last ``validation_fraction`` of them are held out of the statistics
collection and used only to validate (``validation_fraction: 0`` validates on the calibration samples
themselves). The metric is top-1 accuracy when the model has labels for its calibration split
(``resolve.targets``; not with a user-given calibration file), otherwise top-1 agreement with the
FP32 IR's own outputs on those samples (the gate's metric), and cosine similarity to them for models
whose output is not a class vector.

NNCF ranks the quantized ops by how far each moves the outputs (normalized MSE), and reverts them in
that order. When the bound cannot be met (or NNCF had to revert every quantizer), the step
fails with an :class:`OptimizationError` that says what was reached, rather than writing a variant
that breaks its own bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from optiserve.errors import OptimizationError
from optiserve.types import Variant

from ._openvino_common import (
    NncfQuantizeConfig,
    NncfQuantizer,
    batches,
    compile_cpu,
    count_fake_quantize,
    first_line,
    nncf_advanced,
    nncf_quantize_kwargs,
    read_ir,
    run_compiled,
    save_quantized,
)
from .base import OptimizeContext, Produced

if TYPE_CHECKING:
    import numpy as np


class NncfAccuracyControlConfig(NncfQuantizeConfig):
    max_drop: float = Field(default=0.01, ge=0)
    """Largest allowed metric drop from the FP32 IR on the validation samples."""
    drop_type: Literal["absolute", "relative"] = "absolute"
    validation_fraction: float = Field(default=0.5, ge=0, lt=1)
    """Share of the calibration samples held out for validation only (0: validate on all of them)."""
    max_num_iterations: int | None = Field(default=None, ge=1)
    """At most this many quantized ops reverted to floating point (None: as many as needed)."""
    ranking_subset_size: int | None = Field(default=None, ge=1)
    """Validation samples used to rank the quantized ops (None: NNCF picks)."""


class NncfInt8AccuracyControl(NncfQuantizer):
    name: ClassVar[str] = "nncf-int8-ac"
    tag: ClassVar[str] = "nncf-int8-ac"
    description: ClassVar[str] = "OpenVINO IR → INT8 with NNCF, reverting ops until the drop is ≤ max_drop"
    Config = NncfAccuracyControlConfig
    config: NncfAccuracyControlConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        model = read_ir(parent, parent_dir)
        samples = ctx.calibration(parent.model)
        n_val = round(len(samples) * self.config.validation_fraction)
        if self.config.validation_fraction > 0 and not 0 < n_val < len(samples):
            raise OptimizationError(
                f"{len(samples)} calibration samples cannot be split {1 - self.config.validation_fraction:g}"
                f"/{self.config.validation_fraction:g} into calibration and validation; use more samples"
            )
        fixed = parent.model.inputs[0].fixed_batch
        calib = batches(samples[: len(samples) - n_val] if n_val else samples, fixed)
        val_samples = samples[len(samples) - n_val :] if n_val else samples
        val_items = [(i, b) for i, b in enumerate(batches(val_samples, fixed))]
        fp32 = compile_cpu(model, ctx.threads)
        metric = self._metric(parent, ctx, samples, val_samples, fixed, fp32)
        reference, _ = metric(fp32, val_items)
        restorer = AdvancedAccuracyRestorerParameters(
            ranking_subset_size=self.config.ranking_subset_size,
            **(
                {"max_num_iterations": self.config.max_num_iterations}
                if self.config.max_num_iterations
                else {}
            ),
        )
        try:
            quantized = nncf.quantize_with_accuracy_control(
                model,
                nncf.Dataset(calib),
                nncf.Dataset(val_items, lambda item: item[1]),
                metric,
                max_drop=self.config.max_drop,
                drop_type=nncf.DropType(self.config.drop_type),
                **nncf_quantize_kwargs(self.config, len(calib), model),
                advanced_quantization_parameters=nncf_advanced(self.config),
                advanced_accuracy_restorer_parameters=restorer,
            )
        except Exception as e:
            raise OptimizationError(f"NNCF accuracy-controlled quantization failed: {first_line(e)}") from e
        if count_fake_quantize(quantized) == 0:
            raise OptimizationError(
                f"NNCF had to revert every quantizer to floating point: no INT8 variant of {parent.id} "
                f"keeps the {self.config.drop_type} drop within {self.config.max_drop:g}",
                hint="raise max_drop or add calibration samples",
            )
        reached, _ = metric(compile_cpu(quantized, ctx.threads), val_items)
        drop = reference - reached
        if self.config.drop_type == "relative":
            drop /= max(abs(reference), 1e-12)
        if drop > self.config.max_drop + 1e-9:
            raise OptimizationError(
                f"NNCF could not keep the {self.config.drop_type} drop within {self.config.max_drop:g} on "
                f"{len(val_samples)} validation samples: reached {reached:.4f} vs FP32 {reference:.4f}",
                hint="raise max_drop, add calibration samples or ignore the sensitive ops",
            )
        return save_quantized(quantized, out_dir, parent)

    def _metric(
        self,
        parent: Variant,
        ctx: OptimizeContext,
        samples: np.ndarray,
        val_samples: np.ndarray,
        fixed: int | None,
        fp32: Any,
    ) -> Callable[[Any, Iterable[tuple[int, np.ndarray]]], tuple[float, list[list[np.ndarray]]]]:
        """NNCF's validation function on items ``(index, batch)``: (metric, outputs of each item).

        Returning the outputs (not per-item metric values) makes NNCF rank the quantized ops by the
        normalized MSE of the outputs, a finer signal than per-sample agreement (0 or 1).
        """
        import numpy as np

        from optiserve.evaluate import metric_for, score
        from optiserve.models.resolve import targets

        chunk = fixed or 32
        ref = run_compiled(fp32, val_samples, chunk)
        labels = targets(parent.model, "calibration", len(samples)) if ctx.calibration_path is None else None
        if labels is not None:
            labels = labels[len(samples) - len(val_samples) :]
        kind = metric_for(parent.model, ref, labels)
        if kind == "max_abs_diff":
            kind = "cosine_similarity"
        size = fixed or 1

        def metric(
            compiled: Any, items: Iterable[tuple[int, np.ndarray]]
        ) -> tuple[float, list[list[np.ndarray]]]:
            chosen = list(items)
            rows = np.concatenate([np.arange(i * size, (i + 1) * size) for i, _ in chosen])
            out = run_compiled(compiled, np.concatenate([b for _, b in chosen]), chunk)
            value = score(kind, out, ref[rows], None if labels is None else labels[rows])
            return value, [[out[k * size : (k + 1) * size]] for k in range(len(chosen))]

        return metric
