"""ONNX (FP32) → OpenVINO IR, FP32 (``openvino-fp32``) or with FP16-compressed weights (``openvino-fp16``).

One implementation, two registry names that differ in ``compress_to_fp16``. The IR is checked
numerically against ONNX Runtime on the ONNX parent. FP16 compression halves the file; the CPU plugin
decompresses the weights to FP32 when it compiles, so it changes size, not CPU speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from optiserve.errors import OptimizationError
from optiserve.types import ArtifactFormat, Precision, Variant

from ._openvino_common import compile_cpu, first_line, parent_path, run_compiled, save_ir
from .base import OptimizeContext, Optimizer, OptimizerConfig, Produced


class OpenVinoIRConfig(OptimizerConfig):
    atol: float = Field(default=1e-3, ge=0)
    """Largest absolute difference from ONNX Runtime allowed on the check inputs (batch 1 and 3)."""


class OpenVinoFP16Config(OpenVinoIRConfig):
    atol: float = Field(default=5e-2, ge=0)
    """FP16 weights move outputs more; checked relative to the largest output magnitude."""


class _OpenVinoIR(Optimizer):
    requires: ClassVar[tuple[str, ...]] = ("openvino", "onnxruntime")
    extra: ClassVar[str] = "openvino"
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)
    output_format: ClassVar[ArtifactFormat | None] = "openvino"
    compress_to_fp16: ClassVar[bool] = False
    precision: ClassVar[Precision] = "fp32"
    Config = OpenVinoIRConfig
    config: OpenVinoIRConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import openvino as ov

        onnx_path = parent_path(parent, parent_dir, "onnx")
        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as e:
            raise OptimizationError(f"OpenVINO cannot convert {onnx_path.name}: {first_line(e)}") from e
        artifacts = save_ir(model, out_dir, compress_to_fp16=self.compress_to_fp16)
        self._check(onnx_path, out_dir / artifacts["model"], parent)
        return Produced(format="openvino", precision=self.precision, artifacts=artifacts)

    def _check(self, onnx_path: Path, xml: Path, parent: Variant) -> None:
        import numpy as np
        import onnxruntime as ort
        import openvino as ov

        spec = parent.model.inputs[0]
        if not spec.dtype.startswith("float"):
            return
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        compiled = compile_cpu(ov.Core().read_model(str(xml)), threads=1)
        rng = np.random.default_rng(0)
        for batch in (spec.fixed_batch,) if spec.fixed_batch else (1, 3):
            x = rng.standard_normal((batch, *spec.sample_shape)).astype(spec.dtype)
            expected = session.run(None, {name: x})[0]
            got = run_compiled(compiled, x)
            scale = max(1.0, float(np.abs(expected).max())) if self.compress_to_fp16 else 1.0
            diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
            if not diff <= self.config.atol * scale:
                raise OptimizationError(
                    f"OpenVINO IR output differs from ONNX Runtime by {diff:.2e} at batch {batch} "
                    f"(allowed {self.config.atol * scale:.1e}; shapes {got.shape} vs {expected.shape})"
                )


class OpenVinoFP32(_OpenVinoIR):
    name: ClassVar[str] = "openvino-fp32"
    tag: ClassVar[str] = "ov"
    description: ClassVar[str] = "ONNX → OpenVINO IR (FP32), verified against ONNX Runtime"


class OpenVinoFP16(_OpenVinoIR):
    name: ClassVar[str] = "openvino-fp16"
    tag: ClassVar[str] = "ov-fp16"
    description: ClassVar[str] = "ONNX → OpenVINO IR with FP16-compressed weights (half the size)"
    compress_to_fp16: ClassVar[bool] = True
    precision: ClassVar[Precision] = "fp16"
    Config = OpenVinoFP16Config
