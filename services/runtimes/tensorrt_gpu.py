"""TensorRT on a CUDA GPU: deserializes a ``tensorrt-*`` engine and runs it with the TensorRT 10 tensor API.

Device buffers are torch CUDA tensors (their ``data_ptr()`` is the address TensorRT reads and writes),
and inference is enqueued on torch's current CUDA stream, then synchronized, so ``infer`` returns host
numpy arrays like every other runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from optiserve.errors import ArtifactError, ServingError
from optiserve.types import ArtifactFormat

from .base import Runtime

if TYPE_CHECKING:
    import numpy as np


class TensorRTGPU(Runtime):
    name: ClassVar[str] = "tensorrt"
    short: ClassVar[str] = "trt"
    description: ClassVar[str] = "TensorRT engine on a CUDA GPU (buffers and stream from torch)"
    requires: ClassVar[tuple[str, ...]] = ("tensorrt", "torch")
    extra: ClassVar[str] = "tensorrt"
    needs_cuda: ClassVar[bool] = True
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("tensorrt",)

    def load(self) -> None:
        import tensorrt as trt
        import torch

        from optiserve.optimizers.tensorrt import read_meta

        if not torch.cuda.is_available():
            raise ServingError(
                "the tensorrt runtime needs torch with CUDA; this torch is a CPU build or sees no GPU",
                hint="install a CUDA build of torch on the GPU machine",
            )
        meta = read_meta(self.variant, self.variant_dir)
        built_with = meta.get("tensorrt_version")
        path = self.variant_dir / self.variant.artifacts["engine"].path
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._trt_runtime = trt.Runtime(self._logger)
        try:
            engine = self._trt_runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception as e:
            raise ArtifactError(f"TensorRT cannot deserialize {path}: {e}") from e
        if engine is None:
            raise ArtifactError(
                f"TensorRT {trt.__version__} cannot deserialize {path.name} (built with TensorRT "
                f"{built_with}); engines run only on the TensorRT version and GPU that built them: "
                "re-run `optiserve optimize` on this machine"
            )
        self._engine: Any = engine
        self._context: Any = engine.create_execution_context()
        self._input: str = meta["inputs"][0]
        self._output: str = meta["outputs"][0]
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        missing = {self._input, self._output} - names
        if missing:
            raise ArtifactError(f"engine {path.name} has no tensor named {', '.join(sorted(missing))}")
        if engine.get_tensor_mode(self._input) != trt.TensorIOMode.INPUT:
            raise ArtifactError(f"engine tensor {self._input!r} is not an input")
        self._in_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self._input))
        self._out_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self._output))
        # Outputs beyond the first still need an address: TensorRT writes every output it has.
        self._others = [
            n for n in sorted(names) if n not in (self._input, self._output)
            and engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]  # fmt: skip
        self._max_batch = int(engine.get_tensor_profile_shape(self._input, 0)[2][0])
        self.ready = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from optiserve.errors import InputValidationError

        if len(batch) > self._max_batch:
            raise InputValidationError(
                f"batch of {len(batch)} exceeds the engine's profile (at most {self._max_batch})"
            )
        ctx = self._context
        x = torch.from_numpy(batch).to(device="cuda", dtype=self._in_dtype).contiguous()
        if not ctx.set_input_shape(self._input, tuple(x.shape)):
            raise InputValidationError(
                f"input shape {tuple(x.shape)} is outside the engine's optimization profile"
            )
        ctx.set_tensor_address(self._input, x.data_ptr())
        buffers = {}
        for name in (self._output, *self._others):
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = self._out_dtype if name == self._output else _torch_dtype_of(self._engine, name)
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            ctx.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise ServingError("TensorRT failed to enqueue the inference (see its log)")
        stream.synchronize()
        return buffers[self._output].float().cpu().numpy()  # type: ignore[no-any-return]


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
        trt.int64: torch.int64,
    }
    if dtype not in table:
        raise ArtifactError(f"engine tensor type {dtype} is not supported")
    return table[dtype]


def _torch_dtype_of(engine: Any, name: str) -> Any:
    import tensorrt as trt

    return _torch_dtype(trt, engine.get_tensor_dtype(name))
