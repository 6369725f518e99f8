"""Convert an FP32 ONNX variant to FP16 weights and compute, for GPU runtimes (TensorRT, CUDA EP).

Inputs and outputs stay float32 (``keep_io_types``) so clients send the same requests to every
variant; ONNX Runtime's CPU EP runs the graph through inserted casts, which is slow but lets the
variant be evaluated on machines without a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from optiserve.errors import OptimizationError
from optiserve.types import Variant

from . import _onnx_common as common
from .base import OptimizeContext, OptimizerConfig, Produced


class OnnxFp16Config(OptimizerConfig):
    op_block_list: tuple[str, ...] | None = None
    """Op types kept in FP32; None uses the converter's list of ops that overflow or lack FP16 kernels."""
    node_block_list: tuple[str, ...] = ()
    """Node names kept in FP32 (e.g. a softmax or a normalisation that overflows in FP16)."""


class OnnxFp16(common.OnnxRewrite):
    name: ClassVar[str] = "onnx-fp16"
    tag: ClassVar[str] = "fp16"
    description: ClassVar[str] = "ONNX FP32 → FP16 weights and compute (float32 I/O), for GPU runtimes"
    Config = OnnxFp16Config
    config: OnnxFp16Config

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = common.name_nodes(common.load(common.parent_onnx(parent, parent_dir)))
        common.check_node_names(model, self.config.node_block_list, "onnx-fp16 node_block_list")
        try:
            converted = convert_float_to_float16(
                model,
                keep_io_types=True,
                op_block_list=list(self.config.op_block_list)
                if self.config.op_block_list is not None
                else None,
                node_block_list=list(self.config.node_block_list) or None,
            )
        except Exception as e:
            raise OptimizationError(f"FP16 conversion of {parent.id} failed: {common.first_line(e)}") from e
        path = common.output_path(out_dir)
        onnx.save(converted, str(path))
        common.smoke_run(path, common.sample_input(parent), "onnx-fp16")
        return Produced(format="onnx", precision="fp16", artifacts={"model": path.name})
