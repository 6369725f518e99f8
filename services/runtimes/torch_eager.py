"""PyTorch on the CPU: eager mode (the FP32 reference every other variant is compared with), or
``runtime_options: {"compile": true}`` for ``torch.compile`` (inductor; the first inferences compile)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar

from optiserve.artifacts import load_torch_variant
from optiserve.types import ArtifactFormat

from .base import Runtime

if TYPE_CHECKING:
    import numpy as np


class TorchEager(Runtime):
    name: ClassVar[str] = "torch-eager"
    short: ClassVar[str] = "torch"
    description: ClassVar[str] = "PyTorch eager mode (CPU)"
    requires: ClassVar[tuple[str, ...]] = ("torch",)
    extra: ClassVar[str] = "models"
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)
    option_names: ClassVar[tuple[str, ...]] = ("compile",)

    def load(self) -> None:
        import torch

        # Threads are process-wide in torch; the service runs one runtime per process.
        torch.set_num_threads(self.threads.intra_op)
        if torch.get_num_interop_threads() != self.threads.inter_op:
            # Settable once per process, before any parallel work; later calls keep the first value.
            with contextlib.suppress(RuntimeError):
                torch.set_num_interop_threads(self.threads.inter_op)
        self._module: Any = load_torch_variant(self.variant, self.variant_dir)
        if self.options.get("compile"):
            self._module = torch.compile(self._module, dynamic=True)
        self.ready = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self._module(torch.from_numpy(batch))
        return out.numpy()  # type: ignore[no-any-return]
