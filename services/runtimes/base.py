"""The Runtime contract, shared by the service and the in-process evaluation.

``load()`` reads the artifact and sets ``ready``; ``infer(batch)`` maps a batch (first axis) of the
model's single input to its first output. Threads come from the ServiceSpec so an A/B pair runs with
identical resources.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from optiserve.errors import ConfigError
from optiserve.registry import Plugin
from optiserve.types import ArtifactFormat, ThreadSpec, Variant

if TYPE_CHECKING:
    import numpy as np


class Runtime(Plugin, base=True, package="optiserve.services.runtimes"):
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ()
    """Artifact formats this runtime can serve; the variant × runtime matrix is computed from it."""

    short: ClassVar[str] = ""
    """Short label for tables (e.g. ``ort``)."""

    option_names: ClassVar[tuple[str, ...]] = ()
    """Keys this runtime reads from ``ServiceSpec.runtime_options``."""

    uses_streams: ClassVar[bool] = False
    """Whether ``threads.streams`` (parallel inference streams) means anything to this runtime."""

    def __init__(
        self,
        variant: Variant,
        variant_dir: Path,
        threads: ThreadSpec | None = None,
        options: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        self.variant = variant
        self.variant_dir = variant_dir
        self.threads = threads or ThreadSpec()
        self.options = dict(options or {})
        unknown = set(self.options) - set(self.option_names)
        if unknown:
            raise ConfigError(
                f"runtime {self.name!r} has no option {', '.join(sorted(unknown))}; "
                f"known: {', '.join(self.option_names) or '(none)'}"
            )
        self.ready = False

    @classmethod
    def serves(cls, variant: Variant) -> bool:
        return variant.format in cls.formats

    def load(self) -> None:
        raise NotImplementedError

    def infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def infer_any(self, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Any number of samples: chunked, and zero-padded for models exported with a fixed batch size."""
        import numpy as np

        fixed = self.variant.model.inputs[0].fixed_batch
        size = fixed or chunk
        if len(batch) == size or (fixed is None and len(batch) <= size):
            return self.infer(batch)
        outs = []
        for start in range(0, len(batch), size):
            part = batch[start : start + size]
            n = len(part)
            if fixed is not None and n < fixed:
                part = np.concatenate([part, np.zeros((fixed - n, *part.shape[1:]), dtype=part.dtype)])
            outs.append(self.infer(np.ascontiguousarray(part))[:n])
        return np.concatenate(outs, axis=0)

    @property
    def label(self) -> str:
        """How the variant is shown: ``<runtime>-<precision>``, e.g. ``onnxruntime-fp32``."""
        return f"{self.name}-{self.variant.precision}"


def runtimes_for(variant: Variant) -> list[type[Runtime]]:
    """Every registered runtime that accepts this variant's format (available or not)."""
    return [rt for rt in Runtime.registry().values() if rt.serves(variant)]
