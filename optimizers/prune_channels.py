"""Structured pruning: remove whole channels (Conv2d) and neurons (Linear), so every runtime runs faster.

For each prunable layer, the ``ratio`` least important output channels are removed together with
everything that depends on them: the matching BatchNorm entries and the next layer's input channels
(through a Flatten too, where a conv feeds a Linear). The result is a smaller dense network (fewer
parameters and FLOPs), recorded in ``architecture.json``, then fine-tuned on the model's training data
(or trained to match the unpruned parent on the calibration samples where there is none). If the
result agrees with its parent on fewer than ``min_agreement`` of held-out samples, the ratio is halved
and the step retried (``_torch_train.guarded``).

Importance of a channel: the L1 or L2 norm of its filter after folding the following BatchNorm's scale
into it (``γ / sqrt(var + eps) × W``), so a channel that BatchNorm scales down counts as small.

Supported models are sequential CNNs and MLPs: nested ``nn.Sequential`` of Conv2d, Linear, BatchNorm,
activations, pooling, Dropout and Flatten. The last Conv2d/Linear (the output) and grouped or depthwise
convolutions are never pruned; models with branches (residuals) are refused with an OptimizationError.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

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
from optiserve.errors import OptimizationError
from optiserve.types import Variant

from ._torch_train import FineTuneConfig, guarded
from .base import OptimizeContext, Produced, TorchTransform

if TYPE_CHECKING:
    import torch

# Layers data flows through unchanged channel-wise (by class name, all from torch.nn).
_PASSTHROUGH = {
    *("ReLU", "ReLU6", "LeakyReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "ELU"),
    *("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout", "Dropout2d", "Identity", "Flatten"),
}


class PruneChannelsConfig(FineTuneConfig):
    ratio: float = Field(default=0.5, gt=0, lt=1)
    """Fraction of the output channels (neurons) removed from every prunable layer."""
    importance: Literal["l1", "l2"] = "l2"
    """Norm of a channel's (BatchNorm-folded) filter that ranks it."""
    epochs: int = Field(default=2, ge=0)


class PruneChannels(TorchTransform):
    name: ClassVar[str] = "prune-channels"
    tag: ClassVar[str] = "pruned"
    description: ClassVar[str] = "structured channel/neuron pruning (smaller dense layers) + fine-tuning"
    needs_calibration: ClassVar[bool] = True  # only read when the model has no training data
    Config = PruneChannelsConfig
    config: PruneChannelsConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        original = load_torch_variant(parent, parent_dir)
        before = architecture_snapshot(original)

        def attempt(ratio: float) -> tuple[torch.nn.Module, torch.nn.Module] | None:
            module = copy.deepcopy(original)
            return (module, original) if prune_channels(module, ratio, self.config.importance) else None

        r = self.config.ratio
        made = guarded(attempt, [r, r / 2, r / 4, r / 8], parent.model, ctx, self.config, self.name)
        if made is None:
            raise OptimizationError(
                f"{parent.id}: no layer can be channel-pruned at ratio {r} or milder "
                "(the output layer and grouped convolutions are never pruned)"
            )
        module, _ = made
        changes = read_architecture(parent, parent_dir) + architecture_changes(before, module)
        artifacts = save_torch_variant(module, out_dir, changes)
        return Produced(
            format="torch", precision="fp32", artifacts=artifacts, parameters=parameter_count(module)
        )


def sequential_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, layer) of every leaf in execution order; refuses anything but nested nn.Sequential."""
    from torch import nn

    if not isinstance(module, nn.Sequential):
        raise OptimizationError(
            f"prune-channels works on sequential models (nn.Sequential), not {type(module).__name__}",
            hint="models with branches (residual blocks) need a dependency-graph pruner (torch-pruning)",
        )
    leaves: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            leaves += [(f"{name}.{sub}", layer) for sub, layer in sequential_layers(child)]
        else:
            leaves.append((name, child))
    return leaves


def prune_channels(module: torch.nn.Module, ratio: float, importance: str = "l2") -> list[str]:
    """Remove ``ratio`` of the output channels of every prunable layer, in place; returns their paths."""
    from torch import nn

    leaves = sequential_layers(module)
    for path, layer in leaves:
        kind = type(layer).__name__
        if not isinstance(layer, nn.Conv2d | nn.Linear | nn.BatchNorm1d | nn.BatchNorm2d) and (
            kind not in _PASSTHROUGH or type(layer).__module__.split(".")[0] != "torch"
        ):
            raise OptimizationError(f"prune-channels does not know how channels flow through {path} ({kind})")
    producers = [i for i, (_, layer) in enumerate(leaves) if isinstance(layer, nn.Conv2d | nn.Linear)]
    pruned = []
    for p, c in itertools.pairwise(producers):
        (p_path, prod), (c_path, cons) = leaves[p], leaves[c]
        if _grouped(prod) or _grouped(cons):
            continue
        between = leaves[p + 1 : c]
        norms = [
            (i, layer)
            for i, (_, layer) in enumerate(between)
            if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d)
        ]
        n_out = _width(prod)
        n_keep = max(1, round(n_out * (1 - ratio)))
        if n_keep >= n_out:
            continue
        keep = _ranking(prod, [layer for _, layer in norms], importance)[:n_keep].sort().values
        replace_layer(module, p_path, _take(prod, keep, out=True))
        for i, bn in norms:
            replace_layer(module, between[i][0], _take_norm(bn, keep))
        replace_layer(module, c_path, _take(cons, _inputs_for(prod, cons, keep), out=False))
        leaves = sequential_layers(module)  # the replaced layers, for the next pair
        pruned.append(p_path)
    return pruned


def _grouped(layer: Any) -> bool:
    return bool(getattr(layer, "groups", 1) != 1)


def _width(layer: Any) -> int:
    return int(layer.out_channels if hasattr(layer, "out_channels") else layer.out_features)


def _ranking(prod: Any, norms: list[Any], importance: str) -> torch.Tensor:
    """Output channels of ``prod``, most important first."""
    import torch

    with torch.no_grad():
        w = prod.weight.detach().reshape(prod.weight.shape[0], -1).clone()
        for bn in norms:
            if bn.affine and bn.num_features == w.shape[0]:
                scale = bn.weight.detach()
                if bn.running_var is not None:
                    scale = scale / torch.sqrt(bn.running_var + bn.eps)
                w = w * scale[:, None]
        score = w.abs().sum(1) if importance == "l1" else w.norm(dim=1)
    return torch.argsort(score, descending=True, stable=True)


def _inputs_for(prod: Any, cons: Any, keep: torch.Tensor) -> torch.Tensor:
    """The consumer's input indices fed by the kept channels (a block per channel after a Flatten)."""
    import torch

    n_in = cons.in_channels if hasattr(cons, "in_channels") else cons.in_features
    n_out = _width(prod)
    if n_in % n_out:
        raise OptimizationError(
            f"cannot match {n_out} output channels to the next layer's {n_in} inputs (not a multiple)"
        )
    block = n_in // n_out
    cols: torch.Tensor = (keep[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
    return cols


def _take(layer: Any, idx: torch.Tensor, *, out: bool) -> torch.nn.Module:
    """A copy of a Conv2d/Linear with only the output (``out``) or input indices ``idx``."""
    import torch
    from torch import nn

    w = layer.weight.detach()
    w = w[idx] if out else w[:, idx]
    bias = layer.bias is not None
    new: Any
    if isinstance(layer, nn.Conv2d):
        geometry = ("kernel_size", "stride", "padding", "dilation", "padding_mode")
        conv: dict[str, Any] = {k: getattr(layer, k) for k in geometry}
        new = nn.Conv2d(w.shape[1], w.shape[0], bias=bias, **conv)
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias:
            new.bias.copy_(layer.bias.detach()[idx] if out else layer.bias.detach())
    return new.train(layer.training)  # type: ignore[no-any-return]


def _take_norm(bn: Any, idx: torch.Tensor) -> torch.nn.Module:
    import torch

    new = type(bn)(
        len(idx),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach()[idx])
            new.bias.copy_(bn.bias.detach()[idx])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[idx])
            new.running_var.copy_(bn.running_var[idx])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)  # type: ignore[no-any-return]
