"""What the ONNX / ONNX Runtime optimizers share: finding the parent's file, naming nodes so users can
refer to them, pre-processing, and a smoke run that turns ORT's load errors into OptimizationErrors.

Not a plugin module (the leading underscore keeps the registry from scanning it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from optiserve.artifacts import ONNX_MODEL
from optiserve.errors import ArtifactError, ConfigError, OptimizationError
from optiserve.types import ArtifactFormat, Precision, Variant

from .base import Optimizer

if TYPE_CHECKING:
    import onnx

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""The ops that carry weights and most of the time: what "the first/last N nodes" counts."""

KEEP_FLOAT_OPTIMIZERS = ("WeightBiasQuantization",)
"""ORT (>= 1.20) graph passes that quantize float weights of a Conv/Gemm fed by a DequantizeLinear, per
tensor: they undo "keep this node in float" and ruin depthwise convolutions. Sessions that must
compute an excluded node in float disable them."""

GRAPH_REWRITERS = ("ort-optimize",)
"""Steps whose output holds ORT-internal fused ops (FusedConv, NCHWc ...) that other tools cannot read."""


def parent_onnx(parent: Variant, parent_dir: Path) -> Path:
    artifact = parent.artifacts.get("model")
    if artifact is None:
        raise ArtifactError(f"variant {parent.id} has no 'model' artifact (an ONNX file was expected)")
    return parent_dir / artifact.path


def accepts_plain_onnx(parent: Variant) -> bool:
    """Quantizers and converters need standard ONNX ops; a graph ORT already fused is for ORT only."""
    return all(step.optimizer not in GRAPH_REWRITERS for step in parent.steps)


class OnnxRewrite(Optimizer):
    """Base of the optimizers that rewrite an FP32 ONNX graph into another ONNX graph (FP16 conversion,
    ORT graph optimization, INT8 quantization). Not registered itself (no name)."""

    requires: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")
    extra: ClassVar[str] = "onnx"
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)
    output_format: ClassVar[ArtifactFormat | None] = "onnx"
    input_precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)

    def accepts(self, parent: Variant) -> bool:
        return super().accepts(parent) and accepts_plain_onnx(parent)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def load(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:
        raise ArtifactError(f"cannot read ONNX model {path}: {first_line(e)}") from e


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give unnamed nodes a stable ``<OpType>_<index>`` name: exclusions are given by node name, and
    hand-built or converted graphs often leave names empty."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def compute_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS]


def check_node_names(model: onnx.ModelProto, names: Iterable[str], what: str) -> None:
    known = {n.name for n in model.graph.node}
    unknown = [n for n in names if n not in known]
    if unknown:
        some = ", ".join(compute_nodes(model)[:6])
        raise ConfigError(
            f"{what}: no node named {', '.join(map(repr, unknown))} in the model "
            f"(its weighted nodes are named like: {some} ...)"
        )


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(x, W, b)`` with a constant ``W`` as ``MatMul(x, Wᵀ) + b``, in place.

    Exporters write 2-D linear layers as Gemm, which ORT's dynamic quantizer leaves in float;
    as MatMul they become MatMulInteger. Returns how many nodes were rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes: list[Any] = []
    rewritten = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        )
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            w = inits[node.input[1]]
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{out}_matmul" if has_bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [mm_out], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}_bias"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def preprocess(src: Path, dst: Path) -> None:
    """ORT's recommended pre-quantization pass (shape inference + graph cleanup): without shapes the
    quantizer skips tensors it cannot type, and unfused BatchNorms would be quantized on their own."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as e:
        raise OptimizationError(f"quantization pre-processing failed: {first_line(e)}") from e


def smoke_run(path: Path, sample: Any, what: str) -> Any:
    """Load and run ``path`` once on the CPU EP, so a model ORT cannot execute fails here, naming the op,
    instead of at serving time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: sample})[0]
    except Exception as e:
        message = first_line(e)
        node = re.search(r"node (?:with name )?'?([\w./:-]+)'?", message)
        where = f" (node {node.group(1)})" if node else ""
        raise OptimizationError(f"{what}: ONNX Runtime cannot run the result{where}: {message}") from e


def output_path(out_dir: Path) -> Path:
    return out_dir / ONNX_MODEL


def sample_input(parent: Variant) -> Any:
    """One seeded batch-1 input for :func:`smoke_run`."""
    import numpy as np

    spec = parent.model.inputs[0]
    rng = np.random.default_rng(0)
    if spec.dtype.startswith("float"):
        return rng.standard_normal((1, *spec.sample_shape)).astype(spec.dtype)
    return rng.integers(0, 10, size=(1, *spec.sample_shape)).astype(spec.dtype)


def channel_means(path: Path, tensors: list[str], samples: Any, batch: int = 32) -> dict[str, Any]:
    """Per-channel means (axis 1; the last axis of 2-D tensors) of intermediate ``tensors`` of the
    model at ``path`` over ``samples``, accumulated batch by batch so memory stays bounded."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = load(path)
    present = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(KEEP_FLOAT_OPTIMIZERS),
        )
    except Exception as e:
        raise OptimizationError(f"cannot expose intermediate tensors of {path.name}: {first_line(e)}") from e
    wanted = set(tensors)
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    sums: dict[str, Any] = {}
    for start in range(0, len(samples), batch):
        chunk = np.ascontiguousarray(samples[start : start + batch])
        for name, value in zip(names, session.run(None, {input_name: chunk}), strict=True):
            if name in wanted:
                channel = 1 if value.ndim > 2 else value.ndim - 1
                axes = tuple(i for i in range(value.ndim) if i != channel)
                sums[name] = sums.get(name, 0.0) + value.astype(np.float64).mean(axis=axes) * len(chunk)
    return {name: total / len(samples) for name, total in sums.items()}
