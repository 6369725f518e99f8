"""Reading and writing the artifact formats that more than one stage touches."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from optiserve.errors import ArtifactError
from optiserve.types import Variant

if TYPE_CHECKING:
    import torch

TORCH_WEIGHTS = "model.pt"
ONNX_MODEL = "model.onnx"


def save_torch_weights(module: torch.nn.Module, path: Path) -> None:
    """A plain state_dict: loadable with ``weights_only=True`` (no pickled code)."""
    import torch

    torch.save(module.state_dict(), path)


def load_torch_variant(variant: Variant, directory: Path) -> torch.nn.Module:
    """Rebuild the architecture from the model spec, then load the variant's own weights."""
    import torch

    from optiserve.models.resolve import build_torch_module

    if variant.format != "torch":
        raise ArtifactError(f"variant {variant.id} is {variant.format}, not a torch variant")
    module = build_torch_module(variant.model)
    state = torch.load(directory / variant.artifacts["weights"].path, map_location="cpu", weights_only=True)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"variant {variant.id}: weights do not fit the model: {str(e)[:300]}") from e
    return module.eval()


def parameter_count(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
