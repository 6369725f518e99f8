"""ONNX Runtime static INT8 quantization in QDQ format, calibrated on the model's calibration split.

Static quantization fixes every activation range ahead of time, which is what makes INT8 CNNs fast
on CPU (VNNI) and TensorRT; the price is accuracy on layers whose ranges calibrate badly, so the
config can keep chosen nodes, op types or the first/last compute nodes in float.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from optiserve.errors import OptimizationError
from optiserve.types import ArtifactFormat, Precision, Variant

from . import _onnx_common as common
from .base import OptimizeContext, Optimizer, OptimizerConfig, Produced

if TYPE_CHECKING:
    import numpy as np
    import onnx


class OrtInt8StaticConfig(OptimizerConfig):
    calibrate_method: Literal["minmax", "entropy", "percentile", "distribution"] = "minmax"
    percentile: float = Field(99.999, gt=0, le=100)
    """Used by ``percentile``: the share of each activation's values its range must cover."""
    calibration_samples: int | None = Field(None, ge=1)
    """At most this many calibration samples (None: all the context gives)."""
    per_channel: bool = True
    """One scale per output channel: essential for depthwise convolutions."""
    activation_type: Literal["uint8", "int8"] = "uint8"
    """uint8 activations with int8 weights is the pair x86 VNNI kernels run natively."""
    weight_type: Literal["int8", "uint8"] = "int8"
    symmetric_activations: bool = False
    preprocess: bool = True
    """ORT's shape inference and graph cleanup before quantizing (recommended by ORT)."""
    nodes_to_exclude: tuple[str, ...] = ()
    """Node names kept in float (the sensitive ones)."""
    op_types_to_exclude: tuple[str, ...] = ()
    """Op types kept in float everywhere, e.g. ``["Gemm"]`` for the classifier."""
    keep_first: int = Field(0, ge=0)
    """Keep the first N compute nodes (Conv, Gemm, MatMul) in float."""
    keep_last: int = Field(0, ge=0)
    """Keep the last N compute nodes in float (often the classifier)."""
    extra_options: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """Passed to ``quantize_static`` as is (e.g. ``{"CalibMovingAverage": true}``)."""


class OrtInt8Static(Optimizer):
    name: ClassVar[str] = "ort-int8-static"
    tag: ClassVar[str] = "int8"
    description: ClassVar[str] = "ONNX Runtime static INT8 (QDQ), calibrated, sensitive nodes kept in float"
    requires: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")
    extra: ClassVar[str] = "onnx"
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)
    output_format: ClassVar[ArtifactFormat | None] = "onnx"
    input_precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    lossy: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    Config = OrtInt8StaticConfig
    config: OrtInt8StaticConfig

    def accepts(self, parent: Variant) -> bool:
        return super().accepts(parent) and common.accepts_plain_onnx(parent)

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import onnx

        samples = ctx.calibration(parent.model)  # an empty set is refused here, before any work
        if self.config.calibration_samples is not None:
            samples = samples[: self.config.calibration_samples]
        path = common.output_path(out_dir)
        with tempfile.TemporaryDirectory(prefix="ort-int8-static.") as tmp:
            source = Path(tmp) / "input.onnx"
            onnx.save(common.name_nodes(common.load(common.parent_onnx(parent, parent_dir))), str(source))
            if self.config.preprocess:
                common.preprocess(source, Path(tmp) / "pre.onnx")
                source = Path(tmp) / "pre.onnx"
            model = common.load(source)
            excluded = self.excluded_nodes(model)
            self._quantize(source, path, samples, parent.model.inputs[0].name, excluded)
        common.smoke_run(path, samples[:1], "ort-int8-static")
        return Produced(format="onnx", precision="int8", artifacts={"model": path.name})

    def excluded_nodes(self, model: onnx.ModelProto) -> list[str]:
        """The nodes kept in float, checked against the graph so that a typo is not silently ignored."""
        cfg = self.config
        common.check_node_names(model, cfg.nodes_to_exclude, "ort-int8-static nodes_to_exclude")
        compute = common.compute_nodes(model)
        keep = set(cfg.nodes_to_exclude) | set(compute[: cfg.keep_first])
        keep |= set(compute[len(compute) - cfg.keep_last :] if cfg.keep_last else [])
        keep |= {n.name for n in model.graph.node if n.op_type in cfg.op_types_to_exclude}
        return sorted(keep)

    def _quantize(
        self, source: Path, path: Path, samples: np.ndarray, input_name: str, excluded: list[str]
    ) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        cfg = self.config
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
            "distribution": CalibrationMethod.Distribution,
        }[cfg.calibrate_method]
        types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        extra: dict[str, Any] = {"ActivationSymmetric": cfg.symmetric_activations}
        if cfg.calibrate_method == "percentile":
            extra["CalibPercentile"] = cfg.percentile
        extra.update(cfg.extra_options)
        try:
            quantize_static(
                str(source),
                str(path),
                _Reader(samples, input_name),
                quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel,
                activation_type=types[cfg.activation_type],
                weight_type=types[cfg.weight_type],
                nodes_to_exclude=excluded,
                calibrate_method=method,
                extra_options=extra,
            )
        except Exception as e:
            raise OptimizationError(f"static INT8 quantization failed: {common.first_line(e)}") from e


class _Reader:
    """Feeds calibration samples in small batches: fewer ORT runs than one by one, bounded memory."""

    def __init__(self, samples: np.ndarray, input_name: str, batch: int = 8) -> None:
        self._batches = iter(range(0, len(samples), batch))
        self._samples, self._name, self._batch = samples, input_name, batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = next(self._batches, None)
        if start is None:
            return None
        return {self._name: self._samples[start : start + self._batch]}

    def __len__(self) -> int:
        return len(self._samples)
