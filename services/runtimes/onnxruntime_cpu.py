"""ONNX Runtime: the CPU execution provider, or CUDA / TensorRT where a GPU build has them.

``runtime_options: {"execution_provider": "cuda"}`` (or ``"tensorrt"``) puts that provider first with
CPU as the fallback for the ops it does not take; asking for one this onnxruntime build lacks is a
configuration error naming the providers it has (``onnxruntime-gpu`` ships CUDA and TensorRT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from optiserve.errors import ArtifactError, ConfigError
from optiserve.safeload import onnx_external_data
from optiserve.types import ArtifactFormat

from .base import Runtime

if TYPE_CHECKING:
    import numpy as np


PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeCPU(Runtime):
    name: ClassVar[str] = "onnxruntime"
    short: ClassVar[str] = "ort"
    description: ClassVar[str] = "ONNX Runtime, CPU execution provider"
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx")
    """``onnx`` reads where the model keeps its weights before ONNX Runtime opens anything (safeload)."""
    extra: ClassVar[str] = "onnx"
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)
    option_names: ClassVar[tuple[str, ...]] = ("execution_provider",)

    def providers(self) -> list[str]:
        import onnxruntime as ort

        wanted = str(self.options.get("execution_provider", "cpu")).lower()
        if wanted == "cpu":
            return ["CPUExecutionProvider"]
        name = PROVIDERS.get(wanted)
        if name is None:
            raise ConfigError(
                f"unknown execution_provider {wanted!r}; expected one of cpu, {', '.join(PROVIDERS)}"
            )
        available = ort.get_available_providers()
        if name not in available:
            raise ConfigError(
                f"this onnxruntime build has no {name} (it has {', '.join(available)})",
                hint="install onnxruntime-gpu on a machine with a CUDA GPU",
            )
        return [name, "CPUExecutionProvider"]

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads.intra_op
        options.inter_op_num_threads = self.threads.inter_op
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = self.variant_dir / self.variant.artifacts["model"].path
        providers = self.providers()
        onnx_external_data(path, self.variant_dir)  # refuses data files outside the variant's folder
        try:
            # WeightBiasQuantization (ORT >= 1.20) would re-quantize, per tensor, every float Conv/Gemm that
            # follows a DequantizeLinear: it silently undoes "keep this node in float" in INT8 variants.
            self._session: Any = ort.InferenceSession(
                str(path),
                options,
                providers=providers,
                disabled_optimizers=["WeightBiasQuantization"],
            )
        except Exception as e:
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {str(e).strip()[:300]}") from e
        self._input = self._session.get_inputs()[0].name
        self.ready = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]  # type: ignore[no-any-return]
