"""OpenVINO Runtime on the CPU plugin, for OpenVINO IR variants (FP32, FP16-compressed, INT8).

Compiled with ``INFERENCE_NUM_THREADS`` = ``threads.intra_op``, one stream and the LATENCY hint, so it
gets the same resources as the other runtimes of an A/B pair.

Precision: on CPUs with bf16 support (AVX512_BF16, AMX) the CPU plugin's default
``INFERENCE_PRECISION_HINT`` is **bf16**, i.e. an FP32 IR would silently run in bfloat16 (on a Xeon
with AVX512_BF16 this gave 92% top-1 agreement with FP32 on EfficientNet-Lite0's eval crops). The hint
is pinned to ``f32`` here, so an FP32 IR runs in FP32, an FP16-compressed IR has its weights
decompressed to FP32 at compile time, and an INT8 IR runs its non-quantized ops in FP32.
Threads, streams and the performance hint come from the ServiceSpec's ``threads``; ``precision_hint``
is a class attribute.

Devices: CPU by default; ``runtime_options: {"device": "GPU"}`` (an Intel GPU) or ``"AUTO"`` compiles
for that device when OpenVINO sees it, and is a configuration error naming the devices it sees otherwise.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar

from optiserve.errors import ArtifactError, ConfigError
from optiserve.safeload import ONNX_SUFFIX, onnx_external_data
from optiserve.types import ArtifactFormat

from .base import Runtime

if TYPE_CHECKING:
    import numpy as np


class OpenVinoCPU(Runtime):
    name: ClassVar[str] = "openvino"
    short: ClassVar[str] = "ov"
    description: ClassVar[str] = "OpenVINO Runtime, CPU plugin (f32 inference precision, latency hint)"
    requires: ClassVar[tuple[str, ...]] = ("openvino",)
    extra: ClassVar[str] = "openvino"
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("openvino",)

    option_names: ClassVar[tuple[str, ...]] = ("device",)
    uses_streams: ClassVar[bool] = True
    precision_hint: ClassVar[str] = "f32"
    """``f32`` keeps FP32 FP32 (see the module docstring); ``bf16`` trades accuracy for speed."""

    def device(self, core: Any) -> str:
        device = str(self.options.get("device", "CPU")).upper()
        if device != "AUTO" and not any(d.split(".")[0] == device for d in core.available_devices):
            raise ConfigError(
                f"OpenVINO sees no {device} device (it sees {', '.join(core.available_devices)})"
            )
        return device

    def properties(self, device: str = "CPU") -> dict[str, Any]:
        if device != "CPU":  # threads and precision hints are CPU-plugin settings
            return {"PERFORMANCE_HINT": self.threads.performance_hint}
        return {
            "INFERENCE_NUM_THREADS": self.threads.intra_op,
            "NUM_STREAMS": self.threads.streams,
            "PERFORMANCE_HINT": self.threads.performance_hint,
            "INFERENCE_PRECISION_HINT": self.precision_hint,
        }

    def load(self) -> None:
        import openvino as ov

        path = self.variant_dir / self.variant.artifacts["model"].path
        if path.suffix == ONNX_SUFFIX:  # OpenVINO reads ONNX too, external data included
            onnx_external_data(path, self.variant_dir)
        core = ov.Core()
        device = self.device(core)
        try:
            model = core.read_model(str(path))
            self._reshape_for_batching(model)
            self.compiled: Any = core.compile_model(model, device, self.properties(device))
        except Exception as e:
            text = str(e).strip()
            first = (text.splitlines()[0] if text else type(e).__name__)[:300]
            raise ArtifactError(f"OpenVINO cannot load {path}: {first}") from e
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: never used by two threads at once
        self.ready = True

    def _reshape_for_batching(self, model: Any) -> None:
        """Make the batch axis dynamic when the spec says it is but the IR fixed it."""
        import openvino as ov

        if self.variant.model.inputs[0].fixed_batch is not None:
            return
        shape = model.inputs[0].get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() > 0 and shape[0].is_static:
            dims = [ov.Dimension(-1), *list(shape)[1:]]
            model.reshape({model.inputs[0].any_name: ov.PartialShape(dims)})

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self._request.infer({0: batch})
            return result[0].copy()  # type: ignore[no-any-return]
