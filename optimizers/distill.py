"""Knowledge distillation (``distill``): train a narrower student on the teacher's softened outputs.

The student is the built-in model's own ``student(width)`` when it defines one, else a width-scaled copy
of the teacher (:mod:`._students`): every hidden Conv/Linear ``width`` times as wide, so ``width: 0.5``
gives about 4× fewer parameters on a CNN whose weights sit mostly in its dense layers. It is trained
from a seeded initialisation on the model's training set with

    loss = alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − alpha) · CE(student, labels)

(Hinton et al., 2015; the T² keeps the soft term's gradients on the scale of the hard one). The teacher's
logits are computed once, before training. The student's layer shapes differ from the model's, so its
architecture is stored beside its weights and every torch consumer rebuilds it from there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from optiserve.artifacts import load_torch_variant, parameter_count
from optiserve.errors import ArtifactError, OptimizationError
from optiserve.types import Variant

from .base import OptimizeContext, OptimizerConfig, Produced, TorchTransform

if TYPE_CHECKING:
    import numpy as np
    import torch

LOG = "distill.json"


class DistillConfig(OptimizerConfig):
    width: float = Field(0.5, gt=0, le=1)
    """Hidden Conv/Linear channel counts of the student, as a fraction of the teacher's."""
    temperature: float = Field(4.0, gt=0)
    """Softens both distributions in the soft term; higher shows the student more of the teacher's ranking."""
    alpha: float = Field(0.7, ge=0, le=1)
    """Weight of the soft (teacher) term; ``1 - alpha`` goes to cross-entropy with the true labels."""
    epochs: int = Field(4, ge=1)
    lr: float = Field(3e-3, gt=0)
    """Adam's initial learning rate; a cosine schedule takes it to 0 over the run."""
    batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    samples: int | None = Field(None, ge=1)
    """Train on the first N training samples only (None: all of them)."""
    seed: int = 0
    """Seeds the student's initialisation and the batch order."""


class Distill(TorchTransform):
    name: ClassVar[str] = "distill"
    tag: ClassVar[str] = "distill"
    description: ClassVar[str] = "knowledge distillation into a narrower student, on the training set"
    needs_training_data: ClassVar[bool] = True
    Config = DistillConfig
    config: DistillConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        from optiserve.artifacts import architecture_changes, architecture_snapshot, save_torch_variant
        from optiserve.models.resolve import build_torch_module

        from ._students import student_for
        from ._torch_train import deterministic

        cfg = self.config
        data = ctx.training(parent.model)
        if data is None:
            raise OptimizationError(
                f"{parent.model.name} has no labelled training set: distillation needs one",
                hint="use a built-in model with training data, e.g. fashion-cnn",
            )
        x, y = data[0][: cfg.samples], data[1][: cfg.samples]
        teacher = load_torch_variant(parent, parent_dir)
        with deterministic(cfg.seed):
            student, how = student_for(parent.model, teacher, cfg.width)
        _check_outputs(teacher, student, x[:2], how)
        started = time.perf_counter()
        soft = _logits(teacher, x)
        losses = distil(student, soft, x, y, cfg)
        student.eval()
        try:  # against the model as built from its spec: what loading starts from
            base = architecture_snapshot(build_torch_module(parent.model))
            changes = architecture_changes(base, student)
        except ArtifactError as e:
            raise OptimizationError(f"the student's architecture cannot be stored: {e.message}") from e
        artifacts = save_torch_variant(student, out_dir, changes)
        _check_rebuild(parent, out_dir, artifacts, student, x[:8])
        params, teacher_params = parameter_count(student), parameter_count(teacher)
        log = {
            "student": how,
            "parameters": params,
            "teacher_parameters": teacher_params,
            "compression": round(teacher_params / max(1, params), 3),
            "training_samples": len(x),
            "epoch_losses": [round(v, 6) for v in losses],
            "train_seconds": round(time.perf_counter() - started, 2),
        }
        (out_dir / LOG).write_text(json.dumps(log, indent=2) + "\n")
        return Produced(
            format="torch",
            precision="fp32",
            artifacts={**artifacts, "log": LOG},
            parameters=params,
        )


def distil(
    student: torch.nn.Module, teacher_logits: torch.Tensor, x: np.ndarray, y: np.ndarray, cfg: DistillConfig
) -> list[float]:
    """Train ``student`` in place on (x, y) and the teacher's logits; the mean loss of each epoch."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ._torch_train import deterministic

    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ys = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    t = cfg.temperature
    soft_targets = F.log_softmax(teacher_logits / t, dim=1)
    steps_per_epoch = -(-len(xs) // cfg.batch_size)
    losses: list[float] = []
    with deterministic(cfg.seed):
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
        order = torch.Generator().manual_seed(cfg.seed)
        student.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(xs), generator=order)
            total = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                loss = distillation_loss(student(xs[idx]), soft_targets[idx], ys[idx], t, cfg.alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(xs))
            if not np.isfinite(losses[-1]):
                raise OptimizationError(
                    f"distillation diverged (loss {losses[-1]}) in epoch {len(losses)}",
                    hint="lower distill.lr",
                )
    return losses


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha · T² · KL(teacher ‖ student) at temperature T + (1 − alpha) · cross-entropy with the labels.

    ``teacher_log_probs`` is ``log_softmax(teacher_logits / T)``.
    """
    import torch.nn.functional as F

    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        teacher_log_probs,
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def _logits(teacher: torch.nn.Module, x: np.ndarray, chunk: int = 1024) -> torch.Tensor:
    import numpy as np
    import torch

    teacher.eval()
    with torch.inference_mode():
        parts = [
            teacher(torch.from_numpy(np.ascontiguousarray(x[i : i + chunk], dtype=np.float32)))
            for i in range(0, len(x), chunk)
        ]
    return torch.cat(parts).float().clone()  # a normal tensor (inference tensors cannot enter autograd)


def _check_rebuild(
    parent: Variant, out_dir: Path, artifacts: dict[str, str], student: torch.nn.Module, sample: Any
) -> None:
    """Load the student back the way every torch consumer will (spec + architecture.json + weights)."""
    import numpy as np
    import torch

    from optiserve.manifest import describe_artifact

    probe = parent.model_copy(
        update={"artifacts": {name: describe_artifact(out_dir, rel) for name, rel in artifacts.items()}}
    )
    try:
        rebuilt = load_torch_variant(probe, out_dir)
    except ArtifactError as e:
        raise OptimizationError(f"the stored student does not load back: {e.message}") from e
    with torch.inference_mode():
        x = torch.from_numpy(sample)
        same = np.allclose(rebuilt(x).numpy(), student(x).numpy(), atol=1e-5)
    if not same:
        raise OptimizationError(
            "the student rebuilt from architecture.json computes something else than the trained one "
            "(a student() must keep the model's layer names)"
        )


def _check_outputs(teacher: torch.nn.Module, student: torch.nn.Module, sample: Any, how: str) -> None:
    import torch

    teacher.eval()
    student.eval()
    try:
        with torch.inference_mode():
            t = teacher(torch.from_numpy(sample))
            s = student(torch.from_numpy(sample))
    except Exception as e:
        raise OptimizationError(f"the student ({how}) cannot run on the model's input: {e}") from e
    if s.shape != t.shape:
        raise OptimizationError(
            f"the student ({how}) outputs shape {tuple(s.shape)}, the teacher {tuple(t.shape)}"
        )
