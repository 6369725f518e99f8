"""ONNX Runtime with the CPU execution provider."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from optiserve.errors import ArtifactError
from optiserve.types import ArtifactFormat

from .base import Runtime

if TYPE_CHECKING:
    import numpy as np


class OnnxRuntimeCPU(Runtime):
    name: ClassVar[str] = "onnxruntime"
    short: ClassVar[str] = "ort"
    description: ClassVar[str] = "ONNX Runtime, CPU execution provider"
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    extra: ClassVar[str] = "onnx"
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads.intra_op
        options.inter_op_num_threads = self.threads.inter_op
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = self.variant_dir / self.variant.artifacts["model"].path
        try:
            # WeightBiasQuantization (ORT >= 1.20) would re-quantize, per tensor, every float Conv/Gemm that
            # follows a DequantizeLinear: it silently undoes "keep this node in float" in INT8 variants.
            self._session: Any = ort.InferenceSession(
                str(path),
                options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=["WeightBiasQuantization"],
            )
        except Exception as e:
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {str(e).strip()[:300]}") from e
        self._input = self._session.get_inputs()[0].name
        self.ready = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]  # type: ignore[no-any-return]
