"""Low-rank factorization: each Linear (and 1×1 Conv2d) W becomes two smaller layers, W ≈ (U·√S)(√S·Vᵀ).

A layer of shape out×in becomes in→r (no bias) then r→out (the original bias), with r chosen per layer:
  * ``target_ratio``: the two factors keep about this fraction of the layer's weights
    (r = ⌊ratio · in·out / (in + out)⌋), or else
  * ``energy``: the smallest r whose singular values keep this fraction of ΣS² (the squared Frobenius
    norm); the relative error of the factorized weight is then ≤ √(1 − energy).
Layers where r·(in + out) ≥ in·out (no saving) are left alone; when none would shrink, the variant
keeps its parent's weights (and says so). Afterwards the model is fine-tuned on its training data
(or trained to match the parent on the calibration samples where there is none); if it then agrees
with its parent on fewer than ``min_agreement`` of held-out samples, the step is retried keeping
half of what was dropped (``_torch_train.guarded``). The new shapes go to ``architecture.json``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from optiserve.artifacts import (
    architecture_changes,
    architecture_snapshot,
    load_torch_variant,
    parameter_count,
    read_architecture,
    replace_layer,
    save_torch_variant,
)
from optiserve.progress import Steps
from optiserve.types import Variant

from ._torch_train import FineTuneConfig, guarded
from .base import OptimizeContext, Produced, TorchTransform

if TYPE_CHECKING:
    import torch


class LowRankConfig(FineTuneConfig):
    target_ratio: float | None = Field(default=None, gt=0, lt=1)
    """Fraction of each layer's weights to keep; when set, ``energy`` is not used."""
    energy: float = Field(default=0.9, gt=0, le=1)
    """Fraction of the squared singular values each layer keeps (used when target_ratio is None)."""
    min_features: int = Field(default=8, ge=1)
    """Layers with fewer inputs or outputs than this are left alone (nothing to gain)."""


class LowRankSvd(TorchTransform):
    name: ClassVar[str] = "lowrank-svd"
    tag: ClassVar[str] = "lowrank"
    description: ClassVar[str] = "truncated-SVD factorization of Linear/1×1 conv layers + fine-tuning"
    needs_calibration: ClassVar[bool] = True  # only read when the model has no training data
    Config = LowRankConfig
    config: LowRankConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        original = load_torch_variant(parent, parent_dir)
        before = architecture_snapshot(original)
        c = self.config

        def attempt(level: float) -> tuple[torch.nn.Module, torch.nn.Module] | None:
            module = copy.deepcopy(original)
            ratio, energy = (level, c.energy) if c.target_ratio is not None else (None, level)
            return (module, original) if factorize(module, ratio, energy, c.min_features) else None

        start = c.target_ratio if c.target_ratio is not None else c.energy
        # milder: keep half of what was dropped, each time (ratio or energy towards 1)
        levels = [1 - (1 - start) / 2**i for i in range(4)]
        made = guarded(attempt, levels, parent.model, ctx, c, self.name)
        if made is None:
            how = f"target_ratio={c.target_ratio}" if c.target_ratio is not None else f"energy={c.energy}"
            Steps().note(
                f"{self.name}: no layer of {parent.id} shrinks at {how} (or milder, within "
                f"min_agreement); weights unchanged"
            )
            module = original
        else:
            module = made[0]
        changes = read_architecture(parent, parent_dir) + architecture_changes(before, module)
        artifacts = save_torch_variant(module, out_dir, changes)
        return Produced(
            format="torch", precision="fp32", artifacts=artifacts, parameters=parameter_count(module)
        )


def factorize(
    module: torch.nn.Module, target_ratio: float | None, energy: float, min_features: int = 8
) -> dict[str, int]:
    """Replace every layer that shrinks by its two factors, in place; returns {path: rank}."""
    from torch import nn

    done = {}
    candidates = [
        (path, layer)
        for path, layer in module.named_modules()
        if path and (isinstance(layer, nn.Linear) or _pointwise(layer))
    ]
    for path, layer in candidates:
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        n_out, n_in = w.shape
        if min(n_out, n_in) < min_features:
            continue
        rank = _rank(w, target_ratio, energy)
        if rank < 1 or rank * (n_in + n_out) >= n_in * n_out:
            continue
        replace_layer(module, path, _factors(layer, w, rank))
        done[path] = rank
    return done


def _pointwise(layer: Any) -> bool:
    from torch import nn

    return isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1


def _rank(w: torch.Tensor, target_ratio: float | None, energy: float) -> int:
    import torch

    n_out, n_in = w.shape
    if target_ratio is not None:
        return int(target_ratio * n_in * n_out // (n_in + n_out))
    s2 = torch.linalg.svdvals(w.double()) ** 2
    kept = torch.cumsum(s2, 0) / s2.sum()
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def _factors(layer: Any, w: torch.Tensor, rank: int) -> torch.nn.Module:
    import torch
    from torch import nn

    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = torch.sqrt(s[:rank])
    first_w = (root[:, None] * vh[:rank]).float()
    second_w = (u[:, :rank] * root[None, :]).float()
    bias = layer.bias is not None
    first: Any
    second: Any
    if isinstance(layer, nn.Linear):
        first = nn.Linear(w.shape[1], rank, bias=False)
        second = nn.Linear(rank, w.shape[0], bias=bias)
    else:  # 1×1 conv: stride and padding stay on the first factor
        first = nn.Conv2d(w.shape[1], rank, 1, stride=layer.stride, padding=layer.padding, bias=False)
        second = nn.Conv2d(rank, w.shape[0], 1, bias=bias)
        first_w, second_w = first_w[:, :, None, None], second_w[:, :, None, None]
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if bias:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second).train(layer.training)
