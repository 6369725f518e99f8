"""ONNX Runtime dynamic INT8 quantization: weights quantized offline, activations at run time.

No calibration set is needed, which suits transformer and linear models whose activation ranges
vary per input; convolutions gain little from it (use ``ort-int8-static`` for CNNs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar, Literal

from optiserve.errors import OptimizationError
from optiserve.types import Variant

from . import _onnx_common as common
from .base import OptimizeContext, OptimizerConfig, Produced


class OrtInt8DynamicConfig(OptimizerConfig):
    per_channel: bool = False
    weight_type: Literal["int8", "uint8"] = "int8"
    op_types_to_quantize: tuple[str, ...] = ("MatMul", "Attention", "LSTM", "Gather")
    """Conv is left out by default: ORT's CPU ConvInteger has no kernel for int8 weights."""
    nodes_to_exclude: tuple[str, ...] = ()
    gemm_to_matmul: bool = True
    """Rewrite constant-weight Gemm (how exporters write 2-D linear layers) as MatMul + Add first,
    since the dynamic quantizer only quantizes MatMul."""


class OrtInt8Dynamic(common.OnnxRewrite):
    name: ClassVar[str] = "ort-int8-dynamic"
    tag: ClassVar[str] = "int8dyn"
    description: ClassVar[str] = "ONNX Runtime dynamic INT8 (weights offline, activations at run time)"
    lossy: ClassVar[bool] = True
    Config = OrtInt8DynamicConfig
    config: OrtInt8DynamicConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        cfg = self.config
        model = common.name_nodes(common.load(common.parent_onnx(parent, parent_dir)))
        common.check_node_names(model, cfg.nodes_to_exclude, "ort-int8-dynamic nodes_to_exclude")
        if cfg.gemm_to_matmul:
            common.gemm_to_matmul(model)
        path = common.output_path(out_dir)
        with tempfile.TemporaryDirectory(prefix="ort-int8-dynamic.") as tmp:
            source = Path(tmp) / "input.onnx"
            onnx.save(model, str(source))
            try:
                quantize_dynamic(
                    str(source),
                    str(path),
                    op_types_to_quantize=list(cfg.op_types_to_quantize),
                    per_channel=cfg.per_channel,
                    weight_type=QuantType.QInt8 if cfg.weight_type == "int8" else QuantType.QUInt8,
                    nodes_to_exclude=list(cfg.nodes_to_exclude),
                )
            except Exception as e:
                raise OptimizationError(
                    f"dynamic INT8 quantization of {parent.id} failed: {common.first_line(e)}"
                ) from e
        common.smoke_run(path, common.sample_input(parent), "ort-int8-dynamic")
        return Produced(format="onnx", precision="int8", artifacts={"model": path.name})
