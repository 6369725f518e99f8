"""ONNX Runtime's graph optimizations (constant folding, node fusions, layout changes) done once,
offline, and saved as their own variant: the server then loads a model it need not rewrite, and the
fused graph can be compared with the plain one side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from optiserve.errors import OptimizationError
from optiserve.types import Variant

from . import _onnx_common as common
from .base import OptimizeContext, OptimizerConfig, Produced


class OrtGraphOptConfig(OptimizerConfig):
    level: Literal["basic", "extended", "all"] = "extended"
    """``all`` adds layout transforms (NCHWc) tuned to this CPU's instruction set: the saved model
    may run slower, or not at all, on another machine. ``extended`` fusions are portable across CPUs."""


class OrtGraphOpt(common.OnnxRewrite):
    name: ClassVar[str] = "ort-optimize"
    tag: ClassVar[str] = "ortopt"
    description: ClassVar[str] = "ONNX Runtime offline graph optimization (fusions, constant folding)"
    Config = OrtGraphOptConfig
    config: OrtGraphOptConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import onnxruntime as ort

        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        path = common.output_path(out_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[self.config.level]
        options.optimized_model_filepath = str(path)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        source = common.parent_onnx(parent, parent_dir)
        try:
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise OptimizationError(
                f"ONNX Runtime could not optimize {parent.id} ({self.config.level}): {common.first_line(e)}"
            ) from e
        if not path.is_file():
            raise OptimizationError(f"ONNX Runtime did not write the optimized model of {parent.id}")
        common.smoke_run(path, common.sample_input(parent), "ort-optimize")
        return Produced(format="onnx", precision="fp32", artifacts={"model": path.name})
