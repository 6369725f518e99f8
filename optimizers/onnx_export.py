"""Export a torch variant to ONNX with a dynamic batch axis, checked numerically against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from optiserve.artifacts import ONNX_MODEL, load_torch_variant, parameter_count
from optiserve.errors import OptimizationError
from optiserve.types import ArtifactFormat, Variant

from .base import OptimizeContext, Optimizer, OptimizerConfig, Produced


class OnnxExportConfig(OptimizerConfig):
    opset: int = 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    """``dynamo`` is torch's maintained exporter; ``torchscript`` is the legacy one, faster to run."""
    atol: float = 1e-3
    """Largest absolute difference from torch allowed on the check inputs (batch 1 and batch 3)."""


class OnnxExport(Optimizer):
    name: ClassVar[str] = "onnx-export"
    tag: ClassVar[str] = "onnx"
    description: ClassVar[str] = "torch → ONNX (FP32, dynamic batch axis), verified against torch"
    requires: ClassVar[tuple[str, ...]] = ("torch", "onnx", "onnxruntime", "onnxscript")
    extra: ClassVar[str] = "onnx"
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)
    output_format: ClassVar[ArtifactFormat | None] = "onnx"
    Config = OnnxExportConfig
    config: OnnxExportConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import torch

        module = load_torch_variant(parent, parent_dir)
        spec = parent.model.inputs[0]
        out_name = parent.model.outputs[0].name if parent.model.outputs else "output"
        example = torch.randn(2, *spec.sample_shape) if spec.dtype.startswith("float") else None
        if example is None:
            raise OptimizationError(f"{parent.id}: ONNX export of {spec.dtype} inputs is not supported yet")
        path = out_dir / ONNX_MODEL
        self._export(module, example, path, spec.name, out_name)
        self._check(module, path, spec.sample_shape)
        return Produced(
            format="onnx",
            precision="fp32",
            artifacts={"model": ONNX_MODEL},
            parameters=parameter_count(module),
        )

    def _export(self, module: Any, example: Any, path: Path, in_name: str, out_name: str) -> None:
        import torch

        noise = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(noise), _quiet_loggers():
                warnings.simplefilter("ignore")
                if self.config.exporter == "dynamo":
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        input_names=[in_name],
                        output_names=[out_name],
                        opset_version=self.config.opset,
                        dynamo=True,
                        dynamic_shapes=({0: batch},),
                        external_data=False,
                        verbose=False,
                    )
                else:
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        input_names=[in_name],
                        output_names=[out_name],
                        opset_version=min(self.config.opset, 17),
                        dynamo=False,
                        dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
                    )
        except Exception as e:
            raise OptimizationError(f"ONNX export failed: {_first_line(e)}") from e

    def _check(self, module: object, path: Path, sample_shape: tuple[int, ...]) -> None:
        import numpy as np
        import onnxruntime as ort
        import torch

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        rng = np.random.default_rng(0)
        for batch in (1, 3):
            x = rng.standard_normal((batch, *sample_shape)).astype(np.float32)
            with torch.no_grad():
                expected = module(torch.from_numpy(x)).numpy()  # type: ignore[operator]
            got = session.run(None, {name: x})[0]
            if got.shape != expected.shape:
                raise OptimizationError(
                    f"ONNX output shape {got.shape} != torch {expected.shape} at batch {batch}"
                )
            diff = float(np.abs(got - expected).max())
            if not diff <= self.config.atol:
                raise OptimizationError(
                    f"ONNX output differs from torch by {diff:.2e} at batch {batch} "
                    f"(allowed {self.config.atol:.0e})"
                )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


@contextlib.contextmanager
def _quiet_loggers():  # type: ignore[no-untyped-def]
    """torch.onnx logs a warning per missing torchvision op; none of it is the user's business."""
    names = ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")
    old = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)
