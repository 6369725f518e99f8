"""ONNX Runtime static INT8 quantization in QDQ format, calibrated on the model's calibration split.

Static quantization fixes every activation range ahead of time, which is what makes INT8 CNNs fast
on CPU (VNNI) and TensorRT; the price is accuracy on layers whose ranges calibrate badly, so the
config can keep chosen nodes, op types or the first/last compute nodes in float.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from optiserve.errors import OptimizationError
from optiserve.types import Variant

from . import _onnx_common as common
from . import _ort_calibration as calibration
from .base import OptimizeContext, OptimizerConfig, Produced, first_and_last

if TYPE_CHECKING:
    import numpy as np
    import onnx


class OrtInt8StaticConfig(OptimizerConfig):
    """Defaults: the most accurate recipe measured on EfficientNet-Lite0 that keeps the INT8 speed-up
    (benchmarks/int8_efficientnet.py). For that model the benchmark's RECIPE adds ``keep_first: 3``
    (stem + first block in float: their high-resolution activations are the most sensitive, and they
    cost little time), ``keep_last: 1`` (the classifier), ``percentile: 99.99`` and
    ``empirical_bias_correction``. Keeping later high-resolution layers in float costs most of the
    speed-up: a float conv between quantized ones runs unfused."""

    calibrate_method: Literal["minmax", "entropy", "percentile", "distribution"] = "percentile"
    """``percentile`` clips rare outliers; on EfficientNet-Lite0 it beat minmax and entropy (which
    needs far more memory) on the calibration crops."""
    percentile: float = Field(99.999, gt=0, le=100)
    """Used by ``percentile``: the share of each activation's values its range must cover."""
    calibration_samples: int | None = Field(None, ge=1)
    """At most this many calibration samples (None: all the context gives)."""
    per_channel: bool = True
    """One scale per output channel: essential for depthwise convolutions."""
    activation_type: Literal["uint8", "int8"] = "uint8"
    """uint8 activations with int8 weights is the pair x86 VNNI kernels run natively."""
    weight_type: Literal["int8", "uint8"] = "int8"
    reduce_range: bool | Literal["auto"] = Field("auto", validate_default=True)
    """7-bit weights, so that the u8×s8 kernels of x86 CPUs without VNNI cannot saturate; ``auto``
    turns it on exactly there (see :func:`optiserve.hardware.int8_dot_product_saturates`) and is
    resolved when the config is read, so the variant's id and manifest record what was built. The
    model is then tuned for the kind of CPU it was built on, as a TensorRT engine is for its GPU."""

    @field_validator("reduce_range", mode="after")
    @classmethod
    def _resolve_reduce_range(cls, value: bool | str) -> bool:
        from optiserve.hardware import int8_dot_product_saturates

        return int8_dot_product_saturates() if value == "auto" else bool(value)

    symmetric_activations: bool = False
    preprocess: bool = True
    """ORT's shape inference and graph cleanup before quantizing (recommended by ORT)."""
    nodes_to_exclude: tuple[str, ...] = ()
    """Node names kept in float (the sensitive ones). ONNX Runtime >= 1.20 re-quantizes, per tensor,
    a float Conv/Gemm whose input comes from a DequantizeLinear (its WeightBiasQuantization pass)
    unless the session disables that pass; a float prefix (``keep_first``) is not affected."""
    op_types_to_exclude: tuple[str, ...] = ()
    """Op types kept in float everywhere, e.g. ``["Gemm"]`` for the classifier."""
    keep_first: int = Field(0, ge=0)
    """Keep the first N compute nodes (Conv, Gemm, MatMul) in float."""
    keep_last: int = Field(0, ge=0)
    """Keep the last N compute nodes in float (often the classifier)."""
    bias_correction: bool = True
    """Shift each quantized Conv/Gemm bias by the mean output error its rounded weights cause on the
    calibration data (Nagel et al., 2019). Cheap, and on EfficientNet-Lite0 it removes most of the
    damage: weight rounding errors do not average out through depthwise convolutions."""
    empirical_bias_correction: bool = False
    """After quantizing, shift each quantized Conv/Gemm bias, layer by layer in graph order, by the mean
    per-channel output error measured on calibration samples run through the partially corrected
    quantized model (Nagel et al., 2019, empirical variant). Unlike ``bias_correction`` it also
    removes what upstream activation quantization shifts into a layer; costs one pass over
    ``bias_correction_samples`` per layer."""
    bias_correction_samples: int = Field(64, ge=1)
    """Calibration samples ``empirical_bias_correction`` measures on (the first ones)."""
    extra_options: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """Passed to ``quantize_static`` as is (e.g. ``{"CalibMovingAverage": true}``)."""


class OrtInt8Static(common.OnnxRewrite):
    name: ClassVar[str] = "ort-int8-static"
    tag: ClassVar[str] = "int8"
    description: ClassVar[str] = "ONNX Runtime static INT8 (QDQ), calibrated, sensitive nodes kept in float"
    lossy: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    Config = OrtInt8StaticConfig
    config: OrtInt8StaticConfig

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
            # Calibration (a pass over every sample, minutes on a CNN) does not depend on which nodes
            # stay in float, so its ranges are reused when only the exclusions change.
            key = calibration.range_cache_key(parent.id, self._calibration_settings(), samples)
            ranges = Path(tmp) / "ranges.json"
            with calibration.range_cache(ctx.workdir, key, ranges):
                self._quantize(source, path, samples, parent.model.inputs[0].name, excluded, ranges)
            if self.config.bias_correction:
                correct_biases(source, path, samples)
            if self.config.empirical_bias_correction:
                calibration.empirical_bias_correction(
                    source, path, samples[: self.config.bias_correction_samples]
                )
        common.smoke_run(path, samples[:1], "ort-int8-static")
        return Produced(format="onnx", precision="int8", artifacts={"model": path.name})

    def excluded_nodes(self, model: onnx.ModelProto) -> list[str]:
        """The nodes kept in float, checked against the graph so that a typo is not silently ignored."""
        cfg = self.config
        common.check_node_names(model, cfg.nodes_to_exclude, "ort-int8-static nodes_to_exclude")
        compute = common.compute_nodes(model)
        keep = set(cfg.nodes_to_exclude) | set(first_and_last(compute, cfg.keep_first, cfg.keep_last))
        keep |= {n.name for n in model.graph.node if n.op_type in cfg.op_types_to_exclude}
        return sorted(keep)

    def _calibration_settings(self) -> dict[str, Any]:
        """What the calibrated ranges depend on, besides the parent model and the samples."""
        cfg = self.config
        return {
            "method": cfg.calibrate_method,
            "percentile": cfg.percentile,
            "preprocess": cfg.preprocess,
            "symmetric": cfg.symmetric_activations,
            "extra": cfg.extra_options,
        }

    def _quantize(
        self,
        source: Path,
        path: Path,
        samples: np.ndarray,
        input_name: str,
        excluded: list[str],
        ranges: Path,
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
        if cfg.calibrate_method != "minmax":
            extra["CalibStridedMinMax"] = _divisor(len(samples), 32)
        extra.update(cfg.extra_options)
        try:
            quantize_static(
                str(source),
                str(path),
                _Reader(samples, input_name, batch=_divisor(_divisor(len(samples), 32), 8)),
                quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel,
                activation_type=types[cfg.activation_type],
                weight_type=types[cfg.weight_type],
                reduce_range=bool(self.config.reduce_range),
                nodes_to_exclude=excluded,
                calibrate_method=method,
                extra_options=extra,
                calibration_cache_path=str(ranges),
            )
        except Exception as e:
            raise OptimizationError(f"static INT8 quantization failed: {common.first_line(e)}") from e


def correct_biases(float_path: Path, quant_path: Path, samples: np.ndarray) -> int:
    """Rewrite the int32 biases of ``quant_path`` so each layer's mean output matches the float model's.

    The error of a layer with rounded weights ``W + ΔW`` is ``ΔW·x``; its mean per output channel is
    ``ΔW·E[x]``, with ``E[x]`` the float model's per-channel input means (spatial borders ignored).
    Returns how many biases were corrected.
    """
    import onnx
    from onnx import numpy_helper

    fmodel, qmodel = common.load(float_path), common.load(quant_path)
    fnodes = {n.name: n for n in fmodel.graph.node}
    finit = {i.name: i for i in fmodel.graph.initializer}
    qinit = {i.name: i for i in qmodel.graph.initializer}
    producer = {out: n for n in qmodel.graph.node for out in n.output}
    targets: list[tuple[Any, Any, Any]] = []  # (node, weight DQ, bias DQ)
    for node in qmodel.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.name not in fnodes:
            continue
        wdq, bdq = producer.get(node.input[1]), producer.get(node.input[2])
        if _const_dq(wdq, qinit) and _const_dq(bdq, qinit) and fnodes[node.name].input[1] in finit:
            targets.append((node, wdq, bdq))
    if not targets:
        return 0
    means = common.channel_means(
        float_path, sorted({fnodes[n.name].input[0] for n, _, _ in targets}), samples
    )
    for node, wdq, bdq in targets:
        fnode = fnodes[node.name]
        error = _dequantize(wdq, qinit) - numpy_helper.to_array(finit[fnode.input[1]]).astype("float64")
        shift = _mean_output_error(node, error, means[fnode.input[0]])
        bias = bdq.input[0]
        scale = numpy_helper.to_array(qinit[bdq.input[1]]).astype("float64")
        corrected = (numpy_helper.to_array(qinit[bias]) * scale - shift) / scale
        qinit[bias].CopyFrom(
            numpy_helper.from_array(corrected.round().clip(-(2**31), 2**31 - 1).astype("int32"), bias)
        )
    onnx.save(qmodel, str(quant_path))
    return len(targets)


def _const_dq(node: onnx.NodeProto | None, inits: dict[str, onnx.TensorProto]) -> bool:
    return (
        node is not None and node.op_type == "DequantizeLinear" and all(i in inits for i in node.input if i)
    )


def _dequantize(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    import numpy as np
    from onnx import helper, numpy_helper

    q = numpy_helper.to_array(inits[dq.input[0]]).astype("float64")
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype("float64")
    has_zero = len(dq.input) > 2 and dq.input[2]
    zero = numpy_helper.to_array(inits[dq.input[2]]).astype("float64") if has_zero else 0.0
    axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    return (q - np.reshape(zero, shape)) * np.reshape(scale, shape)  # type: ignore[no-any-return]


def _mean_output_error(node: onnx.NodeProto, error: np.ndarray, mean_in: np.ndarray) -> np.ndarray:
    import numpy as np
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        return error @ mean_in if attrs.get("transB", 0) else mean_in @ error  # type: ignore[no-any-return]
    groups = int(attrs.get("group", 1))
    out_channels, in_per_group = error.shape[:2]
    per_input = error.reshape(out_channels, in_per_group, -1).sum(axis=-1)
    group_of = np.arange(out_channels) // (out_channels // groups)
    return np.einsum("oi,oi->o", per_input, mean_in.reshape(groups, in_per_group)[group_of])  # type: ignore[no-any-return]


class _Reader:
    """Feeds calibration samples in small batches: fewer ORT runs than one by one.

    ``set_range`` lets ORT calibrate in strides: histogram calibrators keep every intermediate
    output of one pass in memory (gigabytes for a CNN at 300 samples), so they get bounded passes.
    """

    def __init__(self, samples: np.ndarray, input_name: str, batch: int) -> None:
        self._samples, self._name, self._batch = samples, input_name, batch
        self.set_range(0, len(samples))

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(range(start_index, end_index, self._batch))
        self._end = end_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = next(self._batches, None)
        if start is None:
            return None
        return {self._name: self._samples[start : min(start + self._batch, self._end)]}

    def __len__(self) -> int:
        return len(self._samples)


def _divisor(n: int, most: int) -> int:
    """The largest divisor of ``n`` up to ``most``: ORT needs strides that divide the sample count, and
    histogram calibrators stack a stride's batches, so those must all have the same size."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)
