"""Quantization-aware tuning of an ONNX Runtime INT8 QDQ model (``ort-int8-qat``), no labels needed.

1. ``ort-int8-static`` quantizes the FP32 ONNX parent (its graph is what ONNX Runtime runs fast: every
   ``DequantizeLinear → Conv → QuantizeLinear`` becomes a ``QLinearConv``, ReLU6 clips folded into the
   output ranges);
2. that QDQ graph is rebuilt in torch (:class:`QdqModule`): each quantized weight becomes a float
   parameter that is fake-quantized with the graph's own per-channel scale, each activation
   ``QuantizeLinear`` a fake-quantizer with its fixed scale and zero point (straight-through
   gradients), and the float layers the recipe keeps stay float parameters;
3. optionally (``reconstruct``), each quantized Conv's int8 weights and bias are fitted, layer by layer,
   to the FP32 layer's output on the quantized model's own inputs (:func:`reconstruct`);
4. optionally (``steps``), all weights and biases are trained end to end to reproduce the FP32 parent's
   outputs on the calibration samples (:func:`._torch_train.distill`: KL divergence on softened
   logits, optionally MSE on logits and mixup; the teacher is the parent run by ONNX Runtime);
5. the weights are written back into the QDQ graph as int8 (per channel, same scales) and the biases
   as int32, so the exported model has exactly the structure, and the speed, of the post-training one.

Only weights and biases learn; the scales calibrated in step 1 stay, so no float op appears between a
DequantizeLinear and its QuantizeLinear and the graph keeps fusing. There is no BatchNorm to fold: the
FP32 ONNX export already folded them into the convolutions.

Measured on EfficientNet-Lite0 (benchmarks/int8_qat_efficientnet.py, 500 eval crops of 10 photos no
training crop comes from, 2 threads): the post-training start agrees with FP32 on 92.8% of them, with the
layer-wise reconstruction 93.4%, at a 2.14x batch-1 speed-up; short end-to-end distillation runs did not
raise agreement on held-out photos either. Far from the 99% goal.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from optiserve.errors import OptimizationError
from optiserve.types import Variant

from . import _onnx_common as common
from .base import OptimizeContext, OptimizerConfig, Produced
from .ort_int8_static import OrtInt8Static

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

LOG = "qat.json"
WEIGHT_QMAX = 127
"""Weights stay in [-127, 127], the symmetric range ORT's per-channel int8 quantizer writes, or in
[-64, 64] (REDUCED_WEIGHT_QMAX) where the starting point used ``reduce_range``."""
REDUCED_WEIGHT_QMAX = 64
DEFAULT_PTQ: dict[str, Any] = {"keep_first": 3, "keep_last": 1, "percentile": 99.99}
"""The post-training starting point: benchmarks/int8_efficientnet.py's recipe minus the empirical bias
correction (training supersedes it)."""
MIN_EXPORT_AGREEMENT = 0.95


class OrtInt8QatConfig(OptimizerConfig):
    ptq: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PTQ))
    """``ort-int8-static`` config of the starting point (its ``calibration_samples`` defaults to 300)."""
    steps: int = Field(300, ge=0)
    """Optimizer steps (0: the post-training model, unchanged)."""
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-5, gt=0)
    """Adam's initial learning rate (cosine schedule to 0)."""
    temperature: float = Field(2.0, gt=0)
    """Softening of both models' logits in the KL term (its gradient is scaled by T²)."""
    kl_weight: float = Field(1.0, ge=0)
    mse_weight: float = Field(0.0, ge=0)
    """Weight of the mean squared error between the logits (0: KL only)."""
    mixup: float = Field(0.0, ge=0)
    """Beta(a, a) parameter of mixup between pairs of training samples (0: off): more distinct inputs
    for the teacher to label."""
    holdout: int = Field(100, ge=0)
    """The last N calibration samples are not trained on; the log reports agreement on them."""
    train_samples: int | None = Field(None, ge=1)
    """At most this many calibration samples to train on (None: all the context gives, minus holdout)."""
    seed: int = 0
    reconstruct: bool = True
    """Before distillation, fit every quantized Conv's int8 weights and bias, layer by layer, to the FP32
    layer outputs (:func:`reconstruct`)."""
    reconstruct_samples: int = Field(256, ge=1)
    """Training samples (a seeded subset) the layer-wise reconstruction fits on."""
    reconstruct_positions: int = Field(32, ge=1)
    """Output pixels sampled per sample and layer (each one a row of the layer's fit)."""
    reconstruct_iterations: int = Field(200, ge=1)
    reconstruct_lr: float = Field(1e-2, gt=0)
    """Adam's learning rate for the latent weights, in quantization steps (and for the biases)."""


class OrtInt8Qat(common.OnnxRewrite):
    name: ClassVar[str] = "ort-int8-qat"
    tag: ClassVar[str] = "int8-qat"
    description: ClassVar[str] = (
        "ORT static INT8 (QDQ), then weights distilled from the FP32 model on unlabelled samples"
    )
    requires: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime", "torch")
    lossy: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    Config = OrtInt8QatConfig
    config: OrtInt8QatConfig

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        # The starting point's resolved reduce_range belongs in this variant's id too.
        resolved = OrtInt8Static(self.config.ptq).config.reduce_range
        self.config = self.config.model_copy(update={"ptq": {**self.config.ptq, "reduce_range": resolved}})

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        from ._torch_train import distill

        cfg = self.config
        samples = ctx.calibration(parent.model)
        ptq_cfg = {"calibration_samples": 300, **cfg.ptq}
        holdout = samples[len(samples) - cfg.holdout :] if 0 < cfg.holdout < len(samples) else samples[:0]
        train = samples[: len(samples) - len(holdout)][: cfg.train_samples]
        parent_path = common.parent_onnx(parent, parent_dir)
        path = common.output_path(out_dir)
        started = time.perf_counter()
        ptq = OrtInt8Static(ptq_cfg)
        with tempfile.TemporaryDirectory(prefix="ort-int8-qat.") as tmp:
            ptq.produce(parent, parent_dir, Path(tmp), ctx)
            quantized = common.load(common.output_path(Path(tmp)))
        ptq_s = time.perf_counter() - started
        qmax = REDUCED_WEIGHT_QMAX if ptq.config.reduce_range else WEIGHT_QMAX
        student = QdqModule(quantized, common.load(parent_path), weight_qmax=qmax)
        teacher = _teacher(parent_path)
        layers: list[dict[str, Any]] = []
        if cfg.reconstruct and len(train):
            import numpy as np

            pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.reconstruct_samples])
            layers = reconstruct(
                student,
                parent_path,
                np.ascontiguousarray(train[pick]),
                iterations=cfg.reconstruct_iterations,
                positions=cfg.reconstruct_positions,
                lr=cfg.reconstruct_lr,
                seed=cfg.seed,
            )
        rebuilt_s = time.perf_counter() - started - ptq_s
        losses = distill(
            student,
            teacher,
            train,
            cfg.steps,
            cfg.lr,
            cfg.batch_size,
            cfg.seed,
            temperature=cfg.temperature,
            kl_weight=cfg.kl_weight,
            mse_weight=cfg.mse_weight,
            mixup=cfg.mixup,
        )
        trained_s = time.perf_counter() - started - ptq_s - rebuilt_s
        import onnx

        onnx.save(student.export(), str(path))
        check = holdout if len(holdout) else train[:64]
        log = {
            "ptq": ptq_cfg,
            "training_samples": len(train),
            "holdout_samples": len(holdout),
            "steps": cfg.steps,
            "loss_first_10": _mean(losses[:10]),
            "loss_last_10": _mean(losses[-10:]),
            "onnx_vs_torch_top1_agreement": _export_agreement(student, path, check),
            "holdout_top1_agreement_with_parent": _agreement(path, teacher, check),
            "reconstructed_layers": len(layers),
            "layer_relative_mse_before": _mean([r["relative_mse_before"] for r in layers]),
            "layer_relative_mse_after": _mean([r["relative_mse_after"] for r in layers]),
            "ptq_seconds": round(ptq_s, 1),
            "reconstruct_seconds": round(rebuilt_s, 1),
            "train_seconds": round(trained_s, 1),
        }
        (out_dir / LOG).write_text(json.dumps(log, indent=2) + "\n")
        common.smoke_run(path, samples[:1], "ort-int8-qat")
        return Produced(format="onnx", precision="int8", artifacts={"model": path.name, "log": LOG})


# --- the QDQ graph as a trainable torch module ---------------------------------------------------------


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (x.round() - x).detach()


def _qrange(zero_point: np.ndarray) -> tuple[int, int]:
    import numpy as np

    info = np.iinfo(zero_point.dtype)
    return int(info.min), int(info.max)


class QdqModule:
    """A QDQ ONNX graph of Conv/Gemm/Add/Clip/pooling ops as a torch computation with trainable weights.

    Not an ``nn.Module`` subclass at import time (torch is imported lazily); :meth:`parameters` and
    :meth:`__call__` are what the training loop needs. Weights fed through a constant per-channel
    ``DequantizeLinear`` are float parameters, fake-quantized with that DequantizeLinear's scale;
    int32 biases are float parameters (their rounding is negligible); float Conv/Gemm weights and biases
    (the layers the recipe keeps in float) are plain parameters, initialised from the float model.
    """

    SUPPORTED = (
        "QuantizeLinear",
        "DequantizeLinear",
        "Conv",
        "Gemm",
        "Add",
        "Mul",
        "Clip",
        "Relu",
        "ReduceMean",
        "GlobalAveragePool",
        "MaxPool",
        "AveragePool",
        "Pad",
        "Reshape",
        "Flatten",
        "MatMul",
        "Constant",
    )

    def __init__(
        self,
        quantized: onnx.ModelProto,
        float_model: onnx.ModelProto | None = None,
        weight_qmax: int = WEIGHT_QMAX,
        *,
        quantize_weights: bool = True,
        quantize_activations: bool = True,
    ) -> None:
        """``quantize_weights=False`` runs the float model's weights and biases (needs ``float_model``);
        ``quantize_activations=False`` keeps every activation quantizer's clipping range (it also stands
        for the ReLU6 clips the quantizer folded into it) but not its rounding. Together they split the
        quantized model's error into its two sources (benchmarks/int8_error_budget.py)."""
        from onnx import numpy_helper

        if not quantize_weights and float_model is None:
            raise OptimizationError("QdqModule: float weights need the float model")
        self.weight_qmax = weight_qmax
        self.quantize_weights, self.quantize_activations = quantize_weights, quantize_activations

        unsupported = sorted({n.op_type for n in quantized.graph.node} - set(self.SUPPORTED))
        if unsupported:
            raise OptimizationError(f"ort-int8-qat cannot train a graph with {', '.join(unsupported)}")
        self.model = quantized
        self.consts: dict[str, np.ndarray] = {
            i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer
        }
        for node in quantized.graph.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        floats = (
            {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer} if float_model else {}
        )
        self.params: dict[str, torch.nn.Parameter] = {}
        """Trainable tensors by the name of the initializer they replace (int8/int32/float)."""
        self.weight_dq: dict[str, onnx.NodeProto] = {}
        """Output name → constant DequantizeLinear whose value is a trained tensor."""
        for node in quantized.graph.node:
            if node.op_type in ("Conv", "Gemm"):
                for name in node.input[1:3]:
                    self._make_param(name, floats)
        self.nodes = [n for n in quantized.graph.node if n.op_type != "Constant"]
        self.input_name = quantized.graph.input[0].name
        self.output_name = quantized.graph.output[0].name
        self._tensor_cache: dict[str, torch.Tensor] = {}

    def _make_param(self, name: str, floats: dict[str, np.ndarray]) -> None:
        import torch

        producer = next((n for n in self.model.graph.node if name in n.output), None)
        if producer is not None and producer.op_type == "DequantizeLinear":
            stored = producer.input[0]
            if stored not in self.consts:
                return
            original = floats.get(stored.removesuffix("_quantized"))
            value = _dequantize(producer, self.consts)
            replace = _is_int8(self.consts[stored]) or not self.quantize_weights
            if original is not None and original.shape == value.shape and replace:
                value = original  # latent float weight (rounds to the stored int8), or the float bias
            self.params[stored] = torch.nn.Parameter(torch.from_numpy(value.astype("float32").copy()))
            self.weight_dq[name] = producer
        elif name in self.consts and self.consts[name].dtype.kind == "f":
            self.params[name] = torch.nn.Parameter(
                torch.from_numpy(self.consts[name].astype("float32").copy())
            )

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def train(self) -> QdqModule:
        return self

    def eval(self) -> QdqModule:
        return self

    def _const(self, name: str) -> torch.Tensor:
        import torch

        if name not in self._tensor_cache:
            self._tensor_cache[name] = torch.from_numpy(self.consts[name].astype("float32"))
        return self._tensor_cache[name]

    def _weight(self, dq: onnx.NodeProto) -> torch.Tensor:
        """The fake-quantized weight (int8 per channel) or the float bias of a constant DequantizeLinear."""
        w = self.params[dq.input[0]]
        if self.consts[dq.input[0]].dtype.itemsize != 1 or not self.quantize_weights:
            return w  # an int32 bias (kept float while training), or float weights asked for
        s = self._const(dq.input[1]).reshape(_scale_shape(self.consts[dq.input[1]].size, w.dim(), dq))
        return _round_ste(w / s).clamp(-self.weight_qmax, self.weight_qmax) * s

    def __call__(self, x: torch.Tensor, until: str | None = None) -> torch.Tensor:
        """The graph's output, or (``until``) the named intermediate tensor, computed no further."""
        env: dict[str, torch.Tensor] = {self.input_name: x}
        wanted = until or self.output_name
        for node in self.nodes:
            if node.op_type == "DequantizeLinear" and node.output[0] in self.weight_dq:
                env[node.output[0]] = self._weight(node)
            elif node.op_type == "DequantizeLinear" and node.input[0] in self.consts:
                continue  # a constant no trained op reads
            else:
                env[node.output[0]] = self._run(node, env)
            if wanted in env:
                break
        return env[wanted]

    def quantized_convs(self) -> list[tuple[onnx.NodeProto, str, str | None]]:
        """The Conv nodes with int8 weights, in graph order: (node, stored weight name, stored bias name)."""
        out = []
        for node in self.nodes:
            if node.op_type != "Conv" or node.input[1] not in self.weight_dq:
                continue
            weight = self.weight_dq[node.input[1]].input[0]
            if not _is_int8(self.consts[weight]):
                continue
            bias = self.weight_dq.get(node.input[2]) if len(node.input) > 2 else None
            out.append((node, weight, bias.input[0] if bias is not None else None))
        return out

    def _get(self, name: str, env: dict[str, torch.Tensor]) -> torch.Tensor:
        if name in env:
            return env[name]
        if name in self.params:
            return self.params[name]
        return self._const(name)

    def _run(self, node: onnx.NodeProto, env: dict[str, torch.Tensor]) -> Any:  # a torch.Tensor
        import torch
        import torch.nn.functional as F
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        args: list[Any] = [self._get(name, env) if name else None for name in node.input]
        op = node.op_type
        if op == "QuantizeLinear":
            low, high = _qrange(self.consts[node.input[2]])
            scale, zero = args[1], args[2]
            steps = _round_ste(args[0] / scale) if self.quantize_activations else args[0] / scale
            return (steps + zero).clamp(low, high)
        if op == "DequantizeLinear":
            return (args[0] - args[2]) * args[1]
        if op == "Conv":
            return _conv(args[0], args[1], args[2], attrs)
        if op == "Gemm":
            a = args[0].t() if attrs.get("transA", 0) else args[0]
            b = args[1].t() if attrs.get("transB", 0) else args[1]
            out = attrs.get("alpha", 1.0) * (a @ b)
            return out + attrs.get("beta", 1.0) * args[2] if len(args) > 2 and args[2] is not None else out
        if op == "MatMul":
            return args[0] @ args[1]
        if op == "Add":
            return args[0] + args[1]
        if op == "Mul":
            return args[0] * args[1]
        if op == "Clip":
            lo = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
            hi = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
            return torch.clamp(args[0], _scalar(lo), _scalar(hi))
        if op == "Relu":
            return F.relu(args[0])
        if op == "Pad":
            return _pad(args[0], self.consts, node, attrs)
        if op in ("MaxPool", "AveragePool"):
            return _pool(op, args[0], attrs)
        if op == "GlobalAveragePool":
            return args[0].mean(dim=(2, 3), keepdim=True)
        if op == "ReduceMean":
            axes = attrs.get("axes") or (self.consts[node.input[1]].tolist() if len(node.input) > 1 else None)
            dims = tuple(axes) if axes else tuple(range(args[0].dim()))
            return args[0].mean(dim=dims, keepdim=bool(attrs.get("keepdims", 1)))
        if op == "Reshape":
            x = args[0]
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(self.consts[node.input[1]].tolist())]
            return x.reshape(shape)
        if op == "Flatten":
            return torch.flatten(args[0], start_dim=attrs.get("axis", 1))
        raise OptimizationError(f"ort-int8-qat: unsupported op {op}")

    def export(self, check: bool = True) -> onnx.ModelProto:
        """The QDQ graph with the trained weights: int8 per channel (same scales), int32 biases."""
        import numpy as np
        import onnx
        from onnx import numpy_helper

        if not (self.quantize_weights and self.quantize_activations):
            raise OptimizationError("QdqModule: only a fully quantized module can be exported")
        model = onnx.ModelProto.FromString(self.model.SerializeToString())
        by_stored = {dq.input[0]: dq for dq in self.weight_dq.values()}
        for init in model.graph.initializer:
            if init.name not in self.params:
                continue
            value = self.params[init.name].detach().numpy().astype(np.float64)
            dq = by_stored.get(init.name)
            if dq is not None:
                scale = self.consts[dq.input[1]].astype(np.float64)
                shape = _scale_shape(scale.size, value.ndim, dq)
                bits = self.consts[init.name].dtype
                limit = self.weight_qmax if bits.itemsize == 1 else 2**31 - 1
                q = np.clip(np.round(value / scale.reshape(shape)), -limit, limit).astype(bits)
                init.CopyFrom(numpy_helper.from_array(q, init.name))
            else:
                init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
        if check:
            onnx.checker.check_model(model)
        return model  # type: ignore[no-any-return]


def _is_int8(value: np.ndarray) -> bool:
    return value.dtype.kind in "iu" and value.dtype.itemsize == 1


def _scale_shape(size: int, ndim: int, dq: onnx.NodeProto) -> list[int]:
    """How a DequantizeLinear's scale broadcasts over its ``ndim``-D input: per tensor or along its axis."""
    if size == 1:
        return [1] * ndim
    shape = [1] * ndim
    shape[_axis(dq) % ndim if ndim else 0] = -1
    return shape


def _axis(dq: onnx.NodeProto) -> int:
    from onnx import helper

    return int(next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1))


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.reshape(()).item()) if hasattr(value, "reshape") else float(value)


def _dequantize(dq: onnx.NodeProto, consts: dict[str, np.ndarray]) -> np.ndarray:
    import numpy as np

    q = consts[dq.input[0]].astype(np.float64)
    scale = consts[dq.input[1]].astype(np.float64)
    zero = consts[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    shape = _scale_shape(scale.size, q.ndim, dq)
    return (q - np.reshape(zero, shape)) * np.reshape(scale, shape)  # type: ignore[no-any-return]


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attrs: dict[str, Any]) -> torch.Tensor:
    """ONNX Conv (explicit pads, possibly asymmetric) with torch."""
    import torch.nn.functional as F

    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise OptimizationError("ort-int8-qat: Conv with auto_pad is not supported")
    pads = list(attrs.get("pads", [0] * 4))
    half = len(pads) // 2
    begin, end = pads[:half], pads[half:]
    padding: Any = tuple(begin)
    if begin != end:
        flat: list[int] = []
        for lo, hi in reversed(list(zip(begin, end, strict=True))):
            flat += [lo, hi]
        x = F.pad(x, flat)
        padding = 0
    return F.conv2d(
        x,
        w,
        b,
        stride=tuple(attrs.get("strides", [1, 1])),
        padding=padding,
        dilation=tuple(attrs.get("dilations", [1, 1])),
        groups=int(attrs.get("group", 1)),
    )


def _pad(
    x: torch.Tensor, consts: dict[str, np.ndarray], node: onnx.NodeProto, attrs: dict[str, Any]
) -> torch.Tensor:
    """ONNX Pad, constant mode, pads given as a constant input (opset >= 11)."""
    import torch.nn.functional as F

    mode = attrs.get("mode", b"constant")
    if mode not in (b"constant", "constant") or len(node.input) < 2 or node.input[1] not in consts:
        raise OptimizationError("ort-int8-qat: only constant-mode Pad with constant pads is supported")
    pads = [int(p) for p in consts[node.input[1]].tolist()]
    value = float(consts[node.input[2]].reshape(()).item()) if len(node.input) > 2 and node.input[2] else 0.0
    half = len(pads) // 2
    flat: list[int] = []
    for lo, hi in reversed(list(zip(pads[:half], pads[half:], strict=True))):
        flat += [lo, hi]
    return F.pad(x, flat, value=value)


def _pool(op: str, x: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    """ONNX MaxPool / AveragePool (2-D, symmetric pads, no ceil mode) with torch."""
    import torch.nn.functional as F

    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:] or attrs.get("ceil_mode", 0):
        raise OptimizationError(f"ort-int8-qat: {op} with asymmetric pads or ceil_mode is not supported")
    kernel = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides", [1, 1]))
    if op == "MaxPool":
        return F.max_pool2d(x, kernel, strides, tuple(pads[:2]))
    return F.avg_pool2d(
        x, kernel, strides, tuple(pads[:2]), count_include_pad=bool(attrs.get("count_include_pad", 0))
    )


# --- layer-wise reconstruction ---------------------------------------------------------------------------


def reconstruct(
    student: QdqModule,
    float_path: Path,
    samples: np.ndarray,
    *,
    iterations: int,
    positions: int,
    lr: float,
    seed: int,
    on_layer: Any = None,
) -> list[dict[str, Any]]:
    """Fit the int8 weights and the bias of every quantized Conv, layer by layer in graph order, so that
    its output on the quantized model's own inputs matches the FP32 model's output (AdaQuant, Hubara et
    al. 2021: latent weights in quantization steps, rounded in the forward pass with a straight-through
    gradient; the FP32 target also absorbs what quantized layers upstream pass on). Scales stay as
    calibrated; a layer keeps its post-training weights unless the fit lowers its error.

    Each layer is fitted on ``positions`` sampled output pixels per sample (each pixel: its input patch
    and the FP32 output there), so the fit sees many rows per weight. Returns per-layer mean squared
    errors before/after, relative to the target's variance.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    convs = student.quantized_convs()
    if not convs:
        return []
    targets = _float_rows(common.load(float_path), [node for node, _, _ in convs], samples, positions, rng)
    report = []
    for node, weight, bias in convs:
        idx, y = targets.pop(node.name)
        x = _input_rows(student.export(check=False), node, samples, idx)
        before, after = _fit_layer(student, node, weight, bias, x, y, iterations, lr)
        report.append({"layer": node.name, "relative_mse_before": before, "relative_mse_after": after})
        if on_layer is not None:
            on_layer(report[-1])
    return report


def _float_rows(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    samples: np.ndarray,
    positions: int,
    rng: np.random.Generator,
    batch: int = 8,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each Conv node: ``positions`` sampled output pixels per sample (indices [samples, k]) and the
    FP32 model's outputs there ([rows, groups, out/group]), from one ONNX Runtime pass."""
    import numpy as np
    import torch
    from onnx import helper

    by_name = {n.name: n for n in model.graph.node}
    missing = [n.name for n in nodes if n.name not in by_name]
    if missing:
        raise OptimizationError(f"ort-int8-qat: the float model has no node {missing[0]}")
    names = [by_name[n.name].output[0] for n in nodes]
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in names if t not in present)
    session = _session(model.SerializeToString())
    feed = session.get_inputs()[0].name
    idx: dict[str, list[np.ndarray]] = {n.name: [] for n in nodes}
    rows: dict[str, list[np.ndarray]] = {n.name: [] for n in nodes}
    for start in range(0, len(samples), batch):
        outs = session.run(names, {feed: samples[start : start + batch]})
        for node, out in zip(nodes, outs, strict=True):
            flat = out.reshape(out.shape[0], out.shape[1], -1)
            count = flat.shape[2]
            take = min(positions, count)
            chosen = np.stack([rng.choice(count, take, replace=False) for _ in range(len(flat))])
            idx[node.name].append(chosen)
            rows[node.name].append(np.take_along_axis(flat, chosen[:, None, :], axis=2).transpose(0, 2, 1))
    result = {}
    for node in nodes:
        groups = int(next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1))
        y = np.concatenate(rows.pop(node.name))  # samples, k, channels
        y = y.reshape(-1, groups, y.shape[-1] // groups)
        result[node.name] = (torch.from_numpy(np.concatenate(idx[node.name])), torch.from_numpy(y.copy()))
    return result


def _input_rows(
    model: onnx.ModelProto, node: onnx.NodeProto, samples: np.ndarray, idx: torch.Tensor
) -> torch.Tensor:
    """The input patches of ``node`` at output pixels ``idx`` ([samples, k]) as rows, the input computed
    by ONNX Runtime from ``model`` (its INT8 kernels for a QDQ model: much faster than the torch graph,
    and what will be deployed), a chunk of samples at a time."""
    import onnx
    import torch

    tensor = node.input[0]
    if tensor not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    session = _session(model.SerializeToString())
    name = session.get_inputs()[0].name
    chunks = []
    for i in range(0, len(samples), 16):
        (value,) = session.run([tensor], {name: samples[i : i + 16]})
        chunks.append(_patch_rows(node, torch.from_numpy(value), idx[i : i + 16]))
    return torch.cat(chunks)


def _patch_rows(node: onnx.NodeProto, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The input patches of a Conv at the output pixels ``idx`` ([samples, k]) as rows
    [rows, groups, in/group·k·k]."""
    import torch
    import torch.nn.functional as F
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    groups = int(attrs.get("group", 1))
    pads = list(attrs.get("pads", [0] * 4))
    x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    patches = F.unfold(x, tuple(attrs["kernel_shape"]), stride=tuple(attrs.get("strides", [1, 1])))
    rows = torch.gather(patches, 2, idx[:, None, :].expand(-1, patches.shape[1], -1))
    return rows.permute(0, 2, 1).reshape(-1, groups, patches.shape[1] // groups).contiguous()


def _fit_layer(
    student: QdqModule,
    node: onnx.NodeProto,
    weight: str,
    bias: str | None,
    x: torch.Tensor,
    y: torch.Tensor,
    iterations: int,
    lr: float,
    batch: int = 1024,
) -> tuple[float, float]:
    """Fit one layer's int8 weights and bias on rows (x, y); writes them into ``student`` if better."""
    import torch

    w = student.params[weight].detach()
    out_channels = w.shape[0]
    dq = next(d for d in student.weight_dq.values() if d.input[0] == weight)
    scale = student._const(dq.input[1]).reshape(_scale_shape(student.consts[dq.input[1]].size, w.dim(), dq))
    floor = torch.floor(w / scale)
    u = torch.nn.Parameter(w / scale)  # the latent weight, in quantization steps
    b0 = student.params[bias].detach().clone() if bias is not None else torch.zeros(out_channels)
    b = torch.nn.Parameter(b0.clone())
    groups = x.shape[1]
    xg, yg = x.permute(1, 0, 2).contiguous(), y.permute(1, 0, 2).contiguous()  # groups, rows, ...

    def error(q: torch.Tensor, bias_: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error of the layer with rounding offsets ``q`` (0..1) on ``rows`` (all: None)."""
        wq = ((floor + q).clamp(-student.weight_qmax, student.weight_qmax) * scale).reshape(
            groups, out_channels // groups, -1
        )
        xs, ys = (xg, yg) if rows is None else (xg[:, rows], yg[:, rows])
        out = torch.baddbmm(bias_.reshape(groups, 1, -1), xs, wq.transpose(1, 2))
        return ((out - ys) ** 2).mean()

    variance = float(y.var()) or 1.0
    with torch.no_grad():
        nearest = (w / scale).round() - floor
        base = float(error(nearest, b0)) or 1e-12
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([u, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    for _ in range(iterations):
        rows = torch.randint(0, len(x), (min(batch, len(x)),), generator=generator)
        opt.zero_grad(set_to_none=True)
        loss = error(_round_ste(u) - floor, b, rows) / base
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
    with torch.no_grad():
        hard = u.round() - floor
        before, after = base / variance, float(error(hard, b)) / variance
        if after < before:
            qmax = student.weight_qmax
            student.params[weight].copy_((floor + hard).clamp(-qmax, qmax) * scale)
            if bias is not None:
                student.params[bias].copy_(b)
    return round(before, 6), round(min(after, before), 6)


# --- teacher and checks ---------------------------------------------------------------------------------


def _session(path: Path | bytes, threads: int = 2, fuse: bool = True) -> Any:
    """An ONNX Runtime CPU session; ``fuse=False`` runs the QDQ graph op by op (its reference meaning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(
        source,
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(common.KEEP_FLOAT_OPTIMIZERS),
    )


def _teacher(path: Path) -> Any:
    """The FP32 parent run by ONNX Runtime, as a numpy → numpy function."""
    session = _session(path)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]  # type: ignore[no-any-return]

    return run


def _predict(run: Any, x: np.ndarray, batch: int = 32) -> np.ndarray:
    import numpy as np

    return np.concatenate([run(np.ascontiguousarray(x[i : i + batch])) for i in range(0, len(x), batch)])


def _agreement(path: Path, teacher: Any, x: np.ndarray) -> float:
    """Top-1 agreement of the exported INT8 model with the parent on ``x``."""
    session = _session(path)
    name = session.get_inputs()[0].name
    got = _predict(lambda b: session.run(None, {name: b})[0], x)
    return round(float((got.argmax(1) == _predict(teacher, x).argmax(1)).mean()), 4)


def _export_agreement(student: QdqModule, path: Path, x: np.ndarray) -> float:
    """The exported ONNX must compute what the trained torch graph computes (catches export bugs).

    Compared op by op (no fusion): ORT's fused INT8 kernels round intermediate results differently,
    which flips the top-1 of near-tie samples (on EfficientNet-Lite0's ambiguous crops, 3-6% of them)
    without anything being wrong with the export."""
    import torch

    session = _session(path, fuse=False)
    name = session.get_inputs()[0].name
    got = _predict(lambda b: session.run(None, {name: b})[0], x)
    with torch.no_grad():  # not inference_mode: the cached constants are reused for training
        expected = _predict(lambda b: student(torch.from_numpy(b)).numpy(), x)
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    if agreement < MIN_EXPORT_AGREEMENT:
        raise OptimizationError(
            f"the exported INT8 ONNX agrees with the trained torch graph on only {agreement:.1%} of samples"
        )
    return round(agreement, 4)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 5) if values else None
