"""Unstructured L1-magnitude pruning of every Linear and Conv2d weight, then fine-tuning.

The smallest ``amount`` of weights (by absolute value, over all layers at once or layer by layer) are
set to zero; with training data the model is fine-tuned with the masks in place (pruned weights stay
zero; without training data it learns to match the unpruned parent on the calibration samples
instead). If the result then agrees with its parent on fewer than ``min_agreement`` of held-out
samples, ``amount`` is halved and the whole step retried (see ``_torch_train.guarded``). Finally the
masks are baked into the weights (``torch.nn.utils.prune.remove``), so the variant is a
plain state_dict of the original architecture.

Zeros alone do not make dense runtimes faster: ONNX Runtime, OpenVINO and torch still multiply every
weight. The gain is a smaller compressed artifact and a starting point for sparse kernels; for speed on
dense runtimes use ``prune-channels``, which removes whole channels.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from optiserve.artifacts import load_torch_variant, parameter_count, read_architecture, save_torch_variant
from optiserve.errors import OptimizationError
from optiserve.types import Variant

from ._torch_train import FineTuneConfig, guarded
from .base import OptimizeContext, Produced, TorchTransform

if TYPE_CHECKING:
    import torch


class PruneMagnitudeConfig(FineTuneConfig):
    amount: float = Field(default=0.5, gt=0, lt=1)
    """Fraction of the Linear/Conv2d weights set to zero (halved while the guard fails)."""
    scope: Literal["global", "layer"] = "global"
    """``global``: the smallest weights of the whole model; ``layer``: ``amount`` of each layer."""


class PruneMagnitude(TorchTransform):
    name: ClassVar[str] = "prune-magnitude"
    tag: ClassVar[str] = "sparse"
    description: ClassVar[str] = "unstructured L1 magnitude pruning + fine-tuning (zeros; no dense speed-up)"
    needs_calibration: ClassVar[bool] = True  # only read when the model has no training data
    Config = PruneMagnitudeConfig
    config: PruneMagnitudeConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        from torch.nn.utils import prune

        original = load_torch_variant(parent, parent_dir)
        if not _targets(original):
            raise OptimizationError(f"{parent.id}: no Linear or Conv2d layer to prune")

        def attempt(amount: float) -> tuple[torch.nn.Module, torch.nn.Module]:
            module = copy.deepcopy(original)
            targets = _targets(module)
            if self.config.scope == "global":
                prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
            else:
                for layer, attr in targets:
                    prune.l1_unstructured(layer, attr, amount=amount)  # type: ignore[no-untyped-call]
            return module, original

        a = self.config.amount
        made = guarded(attempt, [a, a / 2, a / 4, a / 8], parent.model, ctx, self.config, self.name)
        assert made is not None
        module, _ = made
        for layer, attr in _targets(module):
            prune.remove(layer, attr)  # type: ignore[no-untyped-call]  # bake the masks: weight = weight_orig * mask, hooks gone
        artifacts = save_torch_variant(module, out_dir, read_architecture(parent, parent_dir))
        return Produced(
            format="torch", precision="fp32", artifacts=artifacts, parameters=parameter_count(module)
        )


def _targets(module: Any) -> list[tuple[Any, str]]:
    import torch

    return [(m, "weight") for m in module.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]


def sparsity(module: torch.nn.Module) -> float:
    """Fraction of exact zeros among the Linear/Conv2d weights of a module."""
    import torch

    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights)) / max(1, total)
