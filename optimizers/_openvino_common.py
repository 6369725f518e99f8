"""Shared by the OpenVINO optimizers: IR files, CPU compilation, NNCF calibration data and settings.

Private (the registry skips modules starting with ``_``). OpenVINO and NNCF are imported inside the
functions, never at module top.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from optiserve.artifacts import ONNX_MODEL
from optiserve.errors import ArtifactError, OptimizationError
from optiserve.types import ArtifactFormat, Variant

from .base import Optimizer, OptimizerConfig, Produced, first_and_last

if TYPE_CHECKING:
    import numpy as np

IR_XML = "model.xml"
IR_BIN = "model.bin"
IR_ARTIFACTS = {"model": IR_XML, "weights": IR_BIN}
"""Both IR files are listed as artifacts, so both are checksummed in the manifest."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def parent_path(parent: Variant, parent_dir: Path, fmt: str) -> Path:
    if parent.format != fmt:
        raise OptimizationError(f"{parent.id} is a {parent.format} variant; this step needs {fmt}")
    name = parent.artifacts["model"].path if "model" in parent.artifacts else ONNX_MODEL
    path = parent_dir / name
    if not path.is_file():
        raise ArtifactError(f"{parent.id}: artifact {path} is missing")
    return path


def read_ir(parent: Variant, parent_dir: Path) -> Any:
    """The parent's IR as an ``openvino.Model``."""
    import openvino as ov

    path = parent_path(parent, parent_dir, "openvino")
    try:
        return ov.Core().read_model(str(path))
    except Exception as e:
        raise ArtifactError(f"OpenVINO cannot read {path}: {first_line(e)}") from e


def save_ir(model: Any, out_dir: Path, *, compress_to_fp16: bool) -> dict[str, str]:
    """Write ``model.xml`` + ``model.bin``; returns the artifacts for :class:`Produced`."""
    import openvino as ov

    try:
        ov.save_model(model, str(out_dir / IR_XML), compress_to_fp16=compress_to_fp16)
    except Exception as e:
        raise OptimizationError(f"OpenVINO could not write the IR: {first_line(e)}") from e
    return dict(IR_ARTIFACTS)


def compile_cpu(model: Any, threads: int, precision: str = "f32") -> Any:
    """Compile for the CPU the way the ``openvino`` runtime does (f32 unless told otherwise)."""
    import openvino as ov

    return ov.Core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
        },
    )


def run_compiled(compiled: Any, samples: np.ndarray, batch: int = 32) -> np.ndarray:
    import numpy as np

    request = compiled.create_infer_request()
    outs = [
        request.infer({0: np.ascontiguousarray(samples[i : i + batch])})[0].copy()
        for i in range(0, len(samples), batch)
    ]
    return np.concatenate(outs, axis=0)


def batches(samples: np.ndarray, fixed_batch: int | None) -> list[np.ndarray]:
    """Calibration items as model inputs: one sample each, or ``fixed_batch`` for fixed-batch models."""
    import numpy as np

    size = fixed_batch or 1
    out = []
    for start in range(0, len(samples), size):
        part = samples[start : start + size]
        if len(part) < size:
            break
        out.append(np.ascontiguousarray(part))
    if not out:
        raise OptimizationError(f"{len(samples)} calibration samples cannot fill one batch of {size}")
    return out


def count_fake_quantize(model: Any) -> int:
    return sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")


def save_quantized(quantized: Any, out_dir: Path, parent: Variant) -> Produced:
    """Refuse a model NNCF left unquantized, then write the INT8 IR."""
    if count_fake_quantize(quantized) == 0:
        raise OptimizationError(
            f"NNCF quantized nothing in {parent.id} (every op ignored or unsupported); "
            "check ignored_names / ignored_types / ignored_patterns"
        )
    return Produced(
        format="openvino", precision="int8", artifacts=save_ir(quantized, out_dir, compress_to_fp16=False)
    )


RangeEstimator = Literal["default", "minmax", "mean_minmax", "median_minmax", "mean_quantile", "histogram"]


class NncfQuantizeConfig(OptimizerConfig):
    """NNCF post-training quantization settings shared by ``nncf-int8`` and ``nncf-int8-ac``."""

    subset_size: int = Field(default=300, ge=1)
    """Calibration samples NNCF collects statistics on (at most the calibration set's size)."""
    preset: Literal["performance", "mixed"] = "mixed"
    """``performance`` (NNCF's default): symmetric weights and activations; ``mixed``: asymmetric
    activations, which spend all 256 levels on one-sided or off-centre ranges (a linear bottleneck's
    output, a residual sum). With ``fast_bias_correction: false``, on EfficientNet-Lite0 (VNNI EPYC,
    2026-12-02, 500 eval crops): top-1 agreement 77.2% at 2.12x → 87.2% at 1.79x over ORT FP32."""
    fast_bias_correction: bool = False
    """True runs NNCF's fast bias correction (its default) instead of the full one, which measures each
    layer's shift on the partly quantized model: seconds slower here, and more accurate."""
    keep_first: int = Field(0, ge=0)
    """Keep the first N compute ops (Convolution, GroupConvolution, MatMul) in float, like
    ``ort-int8-static``'s option of that name (EfficientNet-Lite0: 3 with ``keep_last: 1`` → 91.2%
    agreement at 1.63x)."""
    keep_last: int = Field(0, ge=0)
    """Keep the last N compute ops in float (often the classifier)."""
    disable_bias_correction: bool = False
    model_type: Literal["transformer"] | None = None
    """``transformer`` keeps softmax/layer-norm style ops out of INT8 (NNCF's transformer scheme)."""
    target_device: Literal["ANY", "CPU", "CPU_SPR", "GPU", "NPU"] = "ANY"
    ignored_names: tuple[str, ...] = ()
    """Node names kept in floating point."""
    ignored_types: tuple[str, ...] = ()
    """OpenVINO op types kept in floating point, e.g. ``GroupConvolution`` (depthwise convolutions)."""
    ignored_patterns: tuple[str, ...] = ()
    """Regular expressions over node names kept in floating point."""
    overflow_fix: Literal["auto", "enable", "first_layer_only", "disable"] = Field(
        "auto", validate_default=True
    )
    """7-bit weights against the saturating u8×s8 dot product of x86 CPUs without VNNI (before Cascade
    Lake / Zen 4). ``auto`` (resolved when the config is read, so the variant id records it): ``enable``
    on such CPUs, else ``disable`` (full 8-bit weights, which raised top-1 agreement on
    EfficientNet-Lite0 on a VNNI CPU; see benchmarks/int8_openvino_efficientnet.py). NNCF's own
    default is ``first_layer_only``."""

    @field_validator("overflow_fix", mode="after")
    @classmethod
    def _resolve_overflow_fix(cls, value: str) -> str:
        from optiserve.hardware import int8_dot_product_saturates

        if value != "auto":
            return value
        return "enable" if int8_dot_product_saturates() else "disable"

    activations_range_estimator: RangeEstimator = "minmax"
    """How activation ranges are taken from the calibration statistics; ``minmax`` (no outlier
    clipping) beat NNCF's default on EfficientNet-Lite0 and the tiny test MLP. ``default``: NNCF's."""
    weights_range_estimator: RangeEstimator = "default"
    smooth_quant_alpha: float | None = None
    """SmoothQuant alpha for MatMuls (NNCF's default: only with ``model_type: transformer``); -1 disables."""


COMPUTE_OPS = ("Convolution", "GroupConvolution", "MatMul")


def kept_in_float(model: Any, config: NncfQuantizeConfig) -> list[str]:
    """Names of the compute ops ``keep_first`` / ``keep_last`` name, in the IR's topological order."""
    compute = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in COMPUTE_OPS]
    return first_and_last(compute, config.keep_first, config.keep_last)


def nncf_quantize_kwargs(config: NncfQuantizeConfig, n_items: int, model: Any) -> dict[str, Any]:
    """Keyword arguments shared by ``nncf.quantize`` and ``quantize_with_accuracy_control``."""
    import nncf

    ignored = None
    names = list(dict.fromkeys([*config.ignored_names, *kept_in_float(model, config)]))
    if names or config.ignored_types or config.ignored_patterns:
        ignored = nncf.IgnoredScope(
            names=names,
            types=list(config.ignored_types),
            patterns=list(config.ignored_patterns),
            validate=False,
        )
    return {
        "preset": nncf.QuantizationPreset(config.preset),
        "target_device": nncf.TargetDevice(config.target_device),
        "subset_size": min(config.subset_size, n_items),
        "fast_bias_correction": config.fast_bias_correction,
        "model_type": nncf.ModelType(config.model_type) if config.model_type else None,
        "ignored_scope": ignored,
    }


def nncf_advanced(config: NncfQuantizeConfig) -> Any:
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    def estimator(name: str) -> Any:
        return None if name == "default" else getattr(RangeEstimatorParametersSet, name.upper())

    kwargs: dict[str, Any] = {
        "overflow_fix": OverflowFix(config.overflow_fix),
        "disable_bias_correction": config.disable_bias_correction,
    }
    if config.activations_range_estimator != "default":
        kwargs["activations_range_estimator_params"] = estimator(config.activations_range_estimator)
    if config.weights_range_estimator != "default":
        kwargs["weights_range_estimator_params"] = estimator(config.weights_range_estimator)
    if config.smooth_quant_alpha is not None:
        kwargs["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=config.smooth_quant_alpha)
    return AdvancedQuantizationParameters(**kwargs)


class NncfQuantizer(Optimizer):
    """Base of the NNCF INT8 quantizers of an FP32 OpenVINO IR. Not registered itself (no name)."""

    requires: ClassVar[tuple[str, ...]] = ("openvino", "nncf")
    extra: ClassVar[str] = "openvino"
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("openvino",)
    output_format: ClassVar[ArtifactFormat | None] = "openvino"
    lossy: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
