"""Reading and writing the artifact formats that more than one stage touches.

A torch variant is a plain state_dict (``model.pt``) plus, when an optimizer changed the shape of the
network (channel pruning, low-rank factorization), ``architecture.json``: the ordered list of layers it
replaced, each as ``{"path": "9", "layer": {"type": "Linear", "in_features": ..., ...}}``. Loading
rebuilds the model from its spec, swaps in those layers, then loads the weights strictly. The JSON is
data, not code: only the layer types in ``_LAYERS`` can be built, from numbers and a few fixed words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiserve.errors import ArtifactError
from optiserve.types import Variant

if TYPE_CHECKING:
    import torch

TORCH_WEIGHTS = "model.pt"
ONNX_MODEL = "model.onnx"
ARCHITECTURE = "architecture.json"

# Layer types architecture.json may name, with the constructor arguments it records.
_LAYERS: dict[str, tuple[str, ...]] = {
    "Linear": ("in_features", "out_features", "bias"),
    "Conv2d": (
        *("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias"),
        "padding_mode",
    ),
    "BatchNorm1d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm2d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "Sequential": ("children",),
}
_WORDS = {"same", "valid", "zeros", "reflect", "replicate", "circular"}  # the only strings allowed


def save_torch_weights(module: torch.nn.Module, path: Path) -> None:
    """A plain state_dict: loadable with ``weights_only=True`` (no pickled code)."""
    import torch

    torch.save(module.state_dict(), path)


def load_torch_variant(variant: Variant, directory: Path) -> torch.nn.Module:
    """Rebuild the architecture from the model spec (and architecture.json), then load the weights."""
    import torch

    from optiserve.models.resolve import build_torch_module

    if variant.format != "torch":
        raise ArtifactError(f"variant {variant.id} is {variant.format}, not a torch variant")
    module = build_torch_module(variant.model)
    try:
        for change in read_architecture(variant, directory):
            replace_layer(module, change["path"], _build_layer(change["layer"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"variant {variant.id}: {ARCHITECTURE} does not fit the model: {e}") from e
    state = torch.load(directory / variant.artifacts["weights"].path, map_location="cpu", weights_only=True)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"variant {variant.id}: weights do not fit the model: {str(e)[:300]}") from e
    return module.eval()


def parameter_count(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# --- architecture.json: the layers an optimizer reshaped ------------------------------------------------


def describe_layer(layer: torch.nn.Module) -> dict[str, Any] | None:
    """The JSON description of a layer whose type ``_LAYERS`` knows, else None."""
    kind = type(layer).__name__
    if kind not in _LAYERS or type(layer).__module__.split(".")[0] != "torch":
        return None
    if kind == "Sequential":
        children = [describe_layer(child) for child in layer.children()]
        return None if any(c is None for c in children) else {"type": kind, "children": children}
    desc: dict[str, Any] = {"type": kind}
    for arg in _LAYERS[kind]:
        value = getattr(layer, arg)
        desc[arg] = value is not None if arg == "bias" else value
    result: dict[str, Any] = json.loads(json.dumps(desc))  # tuples → lists, as they are read back
    return result


def architecture_snapshot(module: torch.nn.Module) -> dict[str, dict[str, Any] | None]:
    """Every submodule's description by path: take one before reshaping, pass it to architecture_changes."""
    return {name: describe_layer(m) for name, m in module.named_modules() if name}


def architecture_changes(
    before: dict[str, dict[str, Any] | None], module: torch.nn.Module
) -> list[dict[str, Any]]:
    """The layers of ``module`` that differ from the snapshot ``before`` (outermost changed layer only)."""
    changes: list[dict[str, Any]] = []
    for name, layer in module.named_modules():
        if not name or any(name.startswith(c["path"] + ".") for c in changes):
            continue
        desc = describe_layer(layer)
        if name in before and before[name] == desc:
            continue
        if desc is None:
            raise ArtifactError(
                f"layer {name!r} ({type(layer).__name__}) changed, and architecture.json can only record "
                f"{', '.join(_LAYERS)}"
            )
        changes.append({"path": name, "layer": desc})
    return changes


def read_architecture(variant: Variant, directory: Path) -> list[dict[str, Any]]:
    """The layer replacements of a torch variant, in order ([] when its shape is the model's own)."""
    art = variant.artifacts.get("architecture")
    if art is None:
        return []
    try:
        data = json.loads((directory / art.path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"variant {variant.id}: cannot read {art.path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("replace"), list):
        raise ArtifactError(f"variant {variant.id}: {art.path} has no 'replace' list")
    return data["replace"]  # type: ignore[no-any-return]


def save_torch_variant(
    module: torch.nn.Module, out_dir: Path, changes: list[dict[str, Any]]
) -> dict[str, str]:
    """Write ``model.pt`` and, when layers were replaced, ``architecture.json``; return the artifacts."""
    from optiserve.fsutil import atomic_write_text

    save_torch_weights(module, out_dir / TORCH_WEIGHTS)
    artifacts = {"weights": TORCH_WEIGHTS}
    if changes:
        atomic_write_text(out_dir / ARCHITECTURE, json.dumps({"replace": changes}, indent=1) + "\n")
        artifacts["architecture"] = ARCHITECTURE
    return artifacts


def _build_layer(desc: dict[str, Any]) -> torch.nn.Module:
    from torch import nn

    kind = desc["type"]
    if kind not in _LAYERS:
        raise ValueError(f"layer type {kind!r} is not one of {', '.join(_LAYERS)}")
    args = {k: v for k, v in desc.items() if k != "type"}
    if set(args) != set(_LAYERS[kind]):
        raise ValueError(f"{kind} needs exactly {', '.join(_LAYERS[kind])}, got {', '.join(args)}")
    if kind == "Sequential":
        return nn.Sequential(*(_build_layer(child) for child in args["children"]))
    for key, value in args.items():
        flat = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int | float | bool) or v in _WORDS for v in flat):
            raise ValueError(f"{kind}.{key} = {value!r} is not a number")
    return getattr(nn, kind)(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})  # type: ignore[no-any-return]


def replace_layer(root: torch.nn.Module, path: str, layer: torch.nn.Module) -> None:
    """Put ``layer`` at the dotted ``path`` of ``root`` (e.g. "features.3")."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if not name:
        raise ValueError("the root module cannot be replaced")
    setattr(parent, name, layer)
