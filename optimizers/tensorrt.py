"""TensorRT engines built from an FP32 ONNX parent: ``tensorrt-fp16`` and ``tensorrt-int8``.

Built with the TensorRT 10 Python API: ``trt.OnnxParser`` fills the network, the builder config gets
the FP16 or INT8 flag (INT8 calibrated by an ``IInt8EntropyCalibrator2`` fed from
``ctx.calibration(...)``), and one optimization profile covers the dynamic batch axis (1 … ``max_batch``,
tuned for ``opt_batch``). The artifact is the serialized engine plus ``engine.json``, which records the
ONNX input/output names, the profile and the TensorRT version the engine was built with (an engine
only runs on the TensorRT version and GPU architecture that built it).

An engine is built on the GPU that will serve it; on machines without a CUDA GPU or the ``tensorrt``
package both optimizers are reported unavailable, with the reason, and are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from optiserve.errors import ArtifactError, OptimizationError
from optiserve.types import ArtifactFormat, Precision, Variant

from .base import OptimizeContext, Optimizer, OptimizerConfig, Produced

if TYPE_CHECKING:
    import numpy as np

ENGINE = "model.engine"
ENGINE_META = "engine.json"


class TensorRTConfig(OptimizerConfig):
    max_batch: int = Field(64, ge=1)
    """Largest batch the engine accepts (the optimization profile's max)."""
    opt_batch: int = Field(8, ge=1)
    """The batch size TensorRT tunes its kernels for."""
    workspace_mib: int = Field(1024, ge=16)
    """Scratch GPU memory the builder may use per layer."""
    builder_optimization_level: int = Field(3, ge=0, le=5)
    """TensorRT's build effort: higher searches more tactics (slower builds, sometimes faster engines)."""


class TensorRTInt8Config(TensorRTConfig):
    calibration_samples: int | None = Field(None, ge=1)
    """At most this many calibration samples (None: all the context gives)."""
    calibration_batch: int = Field(16, ge=1)
    """Batch size of the calibration passes (the calibration profile's fixed shape)."""


class _TensorRTBase(Optimizer):
    requires: ClassVar[tuple[str, ...]] = ("tensorrt", "onnx")
    extra: ClassVar[str] = "tensorrt"
    needs_cuda: ClassVar[bool] = True
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)
    output_format: ClassVar[ArtifactFormat | None] = "tensorrt"
    input_precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    lossy: ClassVar[bool] = True
    precision: ClassVar[Precision] = "fp16"
    config: TensorRTConfig

    def accepts(self, parent: Variant) -> bool:
        # TensorRT parses standard ONNX; graphs holding ORT-internal fused ops are for ORT only.
        from ._onnx_common import accepts_plain_onnx

        return super().accepts(parent) and accepts_plain_onnx(parent)

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import tensorrt as trt

        from ._onnx_common import parent_onnx

        cfg = self.config
        if cfg.opt_batch > cfg.max_batch:
            raise OptimizationError(f"{self.name}: opt_batch {cfg.opt_batch} > max_batch {cfg.max_batch}")
        spec = parent.model.inputs[0]
        fixed = spec.fixed_batch
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        onnx_path = parent_onnx(parent, parent_dir)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise OptimizationError(f"TensorRT cannot parse {onnx_path.name}: {errors[:400] or 'no detail'}")
        if network.num_inputs != 1:
            raise OptimizationError(f"{parent.id} has {network.num_inputs} inputs; one is supported")
        inp = network.get_input(0)
        sample = tuple(int(d) for d in inp.shape[1:])
        if any(d < 0 for d in sample):
            raise OptimizationError(
                f"input {inp.name!r} has dynamic axes besides the batch ({tuple(inp.shape)}); "
                "TensorRT profiles here cover the batch axis only"
            )
        lo, opt, hi = (fixed, fixed, fixed) if fixed else (1, cfg.opt_batch, cfg.max_batch)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
        config.builder_optimization_level = cfg.builder_optimization_level
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (lo, *sample), (opt, *sample), (hi, *sample))
        config.add_optimization_profile(profile)
        keep_alive = self._configure(trt, builder, config, inp.name, sample, ctx, parent)

        try:
            serialized = builder.build_serialized_network(network, config)
        except Exception as e:  # the Python bindings raise on some build errors, return None on others
            raise OptimizationError(f"TensorRT engine build failed: {e}") from e
        finally:
            del keep_alive
        if serialized is None:
            raise OptimizationError(
                "TensorRT engine build failed (the builder returned no engine; its log above says why)"
            )
        (out_dir / ENGINE).write_bytes(bytes(serialized))
        outputs = [network.get_output(i).name for i in range(network.num_outputs)]
        meta = {
            "inputs": [inp.name],
            "outputs": outputs,
            "profile": {"min": [lo, *sample], "opt": [opt, *sample], "max": [hi, *sample]},
            "precision": self.precision,
            "tensorrt_version": trt.__version__,
        }
        (out_dir / ENGINE_META).write_text(json.dumps(meta, indent=2) + "\n")
        return Produced(
            format="tensorrt",
            precision=self.precision,
            artifacts={"engine": ENGINE, "meta": ENGINE_META},
        )

    def _configure(
        self,
        trt: Any,
        builder: Any,
        config: Any,
        input_name: str,
        sample: tuple[int, ...],
        ctx: OptimizeContext,
        parent: Variant,
    ) -> object:
        """Set the precision flags; return whatever must stay alive until the build ends."""
        raise NotImplementedError


class TensorRTFp16(_TensorRTBase):
    name: ClassVar[str] = "tensorrt-fp16"
    tag: ClassVar[str] = "trt-fp16"
    description: ClassVar[str] = "TensorRT engine, FP16 kernels allowed (FP32 where faster or needed)"
    precision: ClassVar[Precision] = "fp16"
    Config = TensorRTConfig

    def _configure(
        self,
        trt: Any,
        builder: Any,
        config: Any,
        input_name: str,
        sample: tuple[int, ...],
        ctx: OptimizeContext,
        parent: Variant,
    ) -> object:
        config.set_flag(trt.BuilderFlag.FP16)
        return None


class TensorRTInt8(_TensorRTBase):
    name: ClassVar[str] = "tensorrt-int8"
    tag: ClassVar[str] = "trt-int8"
    description: ClassVar[str] = "TensorRT engine, INT8 (entropy calibration) with FP16 fallback"
    requires: ClassVar[tuple[str, ...]] = ("tensorrt", "onnx", "torch")  # torch: CUDA buffers to calibrate
    precision: ClassVar[Precision] = "int8"
    needs_calibration: ClassVar[bool] = True
    Config = TensorRTInt8Config
    config: TensorRTInt8Config

    def _configure(
        self,
        trt: Any,
        builder: Any,
        config: Any,
        input_name: str,
        sample: tuple[int, ...],
        ctx: OptimizeContext,
        parent: Variant,
    ) -> object:
        samples = ctx.calibration(parent.model)[: self.config.calibration_samples]
        batch = min(self.config.calibration_batch, len(samples))
        fixed = parent.model.inputs[0].fixed_batch
        if fixed is not None:
            batch = fixed
        calibrator = _calibrator(trt, samples, batch)
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers INT8 cannot run fall back to FP16, not FP32
        try:
            config.int8_calibrator = calibrator
            calibration_profile = builder.create_optimization_profile()
            shape = (batch, *sample)
            calibration_profile.set_shape(input_name, shape, shape, shape)
            config.set_calibration_profile(calibration_profile)
        except AttributeError as e:
            raise OptimizationError(
                f"this TensorRT ({trt.__version__}) has no implicit INT8 calibration API: {e}",
                hint="use TensorRT 10.x, or quantize to QDQ ONNX first (qat-int8, ort-int8-static)",
            ) from e
        return calibrator


def _calibrator(trt: Any, samples: np.ndarray, batch: int) -> Any:
    """An ``IInt8EntropyCalibrator2`` that feeds ``samples`` in batches of ``batch`` through CUDA memory."""
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        raise OptimizationError(
            "INT8 calibration copies batches to the GPU with torch, and this torch has no CUDA",
            hint="install a CUDA build of torch on the GPU machine",
        )

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._next = 0
            self._device: torch.Tensor | None = None  # kept alive until TensorRT asks for the next batch

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next + batch > len(samples):
                return None  # whole batches only: the calibration profile has a fixed shape
            host = np.ascontiguousarray(samples[self._next : self._next + batch], dtype=np.float32)
            self._next += batch
            self._device = torch.from_numpy(host).cuda()
            torch.cuda.synchronize()
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return None  # calibrate afresh: the variant id already caches the result

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return EntropyCalibrator()


def read_meta(variant: Variant, directory: Path) -> dict[str, Any]:
    """The engine's ``engine.json`` (input/output names, profile, TensorRT version)."""
    art = variant.artifacts.get("meta")
    if art is None:
        raise ArtifactError(f"variant {variant.id} has no engine.json")
    try:
        meta = json.loads((directory / art.path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"variant {variant.id}: cannot read {art.path}: {e}") from e
    if not isinstance(meta, dict) or not meta.get("inputs") or not meta.get("outputs"):
        raise ArtifactError(f"variant {variant.id}: {art.path} names no inputs/outputs")
    return meta
