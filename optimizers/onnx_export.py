"""Export a torch variant to ONNX with a dynamic batch axis, checked numerically against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from optiserve.artifacts import ONNX_MODEL, load_torch_variant, parameter_count
from optiserve.errors import OptimizationError
from optiserve.types import ArtifactFormat, Variant

from .base import OptimizeContext, Optimizer, OptimizerConfig, Produced

if TYPE_CHECKING:
    import numpy as np


class OnnxExportConfig(OptimizerConfig):
    opset: int = 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    """``dynamo`` is torch's maintained exporter; ``torchscript`` is the legacy one, faster to run."""
    atol: float = 1e-3
    """Largest absolute difference from torch allowed on the check inputs (batch 1 and batch 3)."""


class OnnxExport(Optimizer):
    name: ClassVar[str] = "onnx-export"
    tag: ClassVar[str] = "onnx"
    description: ClassVar[str] = (
        "torch → ONNX (FP32, dynamic batch and sequence axes), verified against torch"
    )
    requires: ClassVar[tuple[str, ...]] = ("torch", "onnx", "onnxruntime", "onnxscript")
    extra: ClassVar[str] = "onnx"
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)
    output_format: ClassVar[ArtifactFormat | None] = "onnx"
    Config = OnnxExportConfig
    config: OnnxExportConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import torch

        from optiserve.models.resolve import dataset

        module = load_torch_variant(parent, parent_dir)
        spec = parent.model.inputs[0]
        out_name = parent.model.outputs[0].name if parent.model.outputs else "output"
        # Real samples where the model has them: the export is traced and then checked on what it will serve.
        samples, _ = dataset(parent.model, "calibration", 3)
        path = out_dir / ONNX_MODEL
        self._export(module, torch.from_numpy(samples[:2]), path, spec.name, out_name, spec.dynamic_axes)
        self._check(module, path, samples, spec.dynamic_axes)
        return Produced(
            format="onnx",
            precision="fp32",
            artifacts={"model": ONNX_MODEL},
            parameters=parameter_count(module),
        )

    def _export(
        self, module: Any, example: Any, path: Path, in_name: str, out_name: str, dynamic: tuple[int, ...]
    ) -> None:
        import torch

        noise = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(noise), _quiet_loggers():
                warnings.simplefilter("ignore")
                if self.config.exporter == "dynamo":
                    axes = {0: torch.export.Dim("batch", min=1, max=4096)}
                    axes.update({ax: torch.export.Dim(f"axis{ax}", min=2, max=65536) for ax in dynamic})
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        input_names=[in_name],
                        output_names=[out_name],
                        opset_version=self.config.opset,
                        dynamo=True,
                        dynamic_shapes=(axes,),
                        external_data=False,
                        verbose=False,
                    )
                else:
                    names = {0: "batch", **{ax: f"axis{ax}" for ax in dynamic}}
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        input_names=[in_name],
                        output_names=[out_name],
                        opset_version=min(self.config.opset, 17),
                        dynamo=False,
                        dynamic_axes={in_name: names, out_name: {0: "batch"}},
                    )
        except Exception as e:
            raise OptimizationError(f"ONNX export failed: {_first_line(e)}") from e

    def _check(self, module: Any, path: Path, samples: np.ndarray, dynamic: tuple[int, ...]) -> None:
        """Batch 1 and batch 3 (and a shorter length on each dynamic axis) must match torch."""
        import numpy as np
        import onnxruntime as ort
        import torch

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        cases = [samples[:1], samples[:3]]
        for ax in dynamic:
            cases.append(np.take(samples[:3], np.arange(max(2, samples.shape[ax] // 2)), axis=ax))
        for x in cases:
            x = np.ascontiguousarray(x)
            with torch.no_grad():
                expected = module(torch.from_numpy(x)).numpy()
            got = session.run(None, {name: x})[0]
            if got.shape != expected.shape:
                raise OptimizationError(
                    f"ONNX output shape {got.shape} != torch {expected.shape} for input {x.shape}"
                )
            diff = float(np.abs(got - expected).max())
            if not diff <= self.config.atol:
                raise OptimizationError(
                    f"ONNX output differs from torch by {diff:.2e} for input {x.shape} "
                    f"(allowed {self.config.atol:.0e})"
                )


_UNSUPPORTED_OP = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),  # dynamo exporter
    re.compile(r"Exporting the operator '?([\w:.]+)'? to ONNX"),  # torchscript exporter
    re.compile(r"Unsupported: ONNX export of operator ([\w:.]+)"),
)


def _first_line(e: BaseException) -> str:
    """The op that has no ONNX conversion when there is one, else the error's first line."""
    text = str(e).strip()
    for pattern in _UNSUPPORTED_OP:
        match = pattern.search(text)
        if match:
            return (
                f"operator {match.group(1)} has no ONNX conversion "
                "(rewrite that part of the model, or try exporter: torchscript)"
            )
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
