"""Built-in models: one file each in this package, found by the registry.

A built-in model knows how to build its torch module with real weights, how to preprocess what users
send, and which real data to evaluate and calibrate on. Heavy imports stay inside methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from optiserve.registry import Plugin
from optiserve.types import ModelSpec

if TYPE_CHECKING:
    import numpy as np
    import torch

Split = Literal["eval", "calibration"]


class BuiltinModel(Plugin, base=True, package="optiserve.models"):
    extra: ClassVar[str] = "models"

    default_optimizers: ClassVar[tuple[str | tuple[str, dict[str, Any]], ...]] = ("onnx-export",)
    """What `optiserve run` applies when the experiment names none: names, or (name, config) pairs."""

    data_description: ClassVar[str] = "samples"
    """What :meth:`dataset` returns, for progress lines and reports (e.g. "real-photo crops")."""

    raw_input: ClassVar[Literal["image", "text"] | None] = None
    """What users send instead of tensors (JPEG/PNG bytes, UTF-8 text); the service preprocesses it."""

    serving_requires: ClassVar[tuple[str, ...]] = ()
    """Imports the service needs for this model besides the runtime's (decoding, tokenizer, labels)."""

    pad_value: ClassVar[float | None] = None
    """Samples of different lengths on a dynamic axis may be padded with this to share a batch."""

    input_bounds: ClassVar[tuple[float, float] | None] = None
    """Valid range of the input's values (e.g. token ids below the vocabulary size); the service checks."""

    @classmethod
    def spec(cls) -> ModelSpec:
        raise NotImplementedError

    @classmethod
    def build(cls) -> torch.nn.Module:
        """The torch module with its real weights, in eval mode."""
        raise NotImplementedError

    @classmethod
    def dataset(cls, split: Split, n: int) -> np.ndarray:
        """``n`` preprocessed samples of real data, deterministic; eval and calibration are disjoint."""
        raise NotImplementedError

    @classmethod
    def describe_data(cls, split: Split, n: int) -> str:
        """What :meth:`dataset` gives for ``split`` and ``n``, in words (with the real count)."""
        return f"{n} {cls.data_description} ({split})"

    @classmethod
    def stress_dataset(cls, n: int) -> np.ndarray | None:
        """An unlabelled second evaluation set on which only agreement with FP32 is measured (a stress
        test beside the labelled one), or None."""
        return None

    @classmethod
    def targets(cls, split: Split, n: int) -> np.ndarray | None:
        """Class labels for the same ``n`` samples as :meth:`dataset` returns, or None (no labels): one
        class per sample, or a (n, k) matrix of acceptable classes padded with -1.

        With labels the accuracy gate uses the task metric (top-1 accuracy); without, agreement with
        the FP32 reference.
        """
        return None

    @classmethod
    def training_data(cls) -> tuple[np.ndarray, np.ndarray] | None:
        """(inputs, labels) to fine-tune, distil or quantization-aware-train on; None when there is none.

        Disjoint from both the eval and the calibration splits.
        """
        return None

    @classmethod
    def labels(cls) -> list[str] | None:
        return None

    @classmethod
    def from_raw(cls, items: list[bytes]) -> np.ndarray:
        """What users send (one item per sample) → the model's input batch, preprocessed as in training.

        Raises :class:`~optiserve.errors.UnsupportedMediaType` for an item that cannot be decoded.
        """
        from optiserve.errors import UnsupportedMediaType

        raise UnsupportedMediaType(f"{cls.name} takes tensors only, not raw {cls.raw_input or 'bytes'}")
