"""A small, deterministic supervised training loop shared by the built-in models and the optimizers
that train (fine-tuning after pruning or factorization, distillation, quantization-aware training).

Deterministic means: the same module, data, hyper-parameters and seed give bit-identical weights on
the same machine. :func:`deterministic` seeds torch, switches on ``torch.use_deterministic_algorithms``
and fixes the thread count for the duration of a block, and restores all three afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import Field

from .base import OptimizeContext, OptimizerConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from optiserve.types import ModelSpec

TRAIN_THREADS = 2
"""Threads used while training: fixed, because a different thread count may change float reductions."""


@contextlib.contextmanager
def deterministic(seed: int, threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Seeded, deterministic algorithms, fixed threads; the global torch state is restored on exit."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
            torch.set_num_threads(old_threads)


def fine_tune(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    *,
    weight_decay: float = 0.0,
    on_step: Callable[[], None] | None = None,
) -> torch.nn.Module:
    """Train ``module`` in place on (x, y) with Adam, then return it in eval mode.

    Integer ``y`` are class labels (cross-entropy loss); float ``y`` are target outputs of the same
    shape as the module's (mean squared error: matching a teacher's logits). The learning rate
    follows a cosine schedule from ``lr`` down to 0 over all steps; batches are a seeded shuffle per
    epoch (the last partial batch is kept). ``on_step`` is called after each optimizer step
    (progress bars). ``epochs=0`` returns the module unchanged.
    """
    import numpy as np
    import torch

    if len(x) != len(y):
        raise ValueError(f"fine_tune: {len(x)} inputs but {len(y)} labels")
    if epochs <= 0 or len(x) == 0:
        return module.eval()
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    labels = np.issubdtype(y.dtype, np.integer)
    ys = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64 if labels else np.float32))
    steps_per_epoch = -(-len(xs) // batch_size)
    with deterministic(seed):
        opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        order = torch.Generator().manual_seed(seed)
        loss_fn = torch.nn.CrossEntropyLoss() if labels else torch.nn.MSELoss()
        module.train()
        for _ in range(epochs):
            perm = torch.randperm(len(xs), generator=order)
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(module(xs[idx]), ys[idx])
                loss.backward()
                opt.step()
                sched.step()
                if on_step is not None:
                    on_step()
    return module.eval()


def steps_for(n: int, epochs: int, batch_size: int) -> int:
    """How many optimizer steps :func:`fine_tune` takes (the total of a progress bar)."""
    return max(0, epochs) * -(-n // batch_size)


def accuracy(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``module`` (in eval mode, no gradients) on (x, y)."""
    import numpy as np
    import torch

    module.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out = module(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)))
            correct += int((out.argmax(1).numpy() == y[i : i + batch_size]).sum())
    return correct / max(1, len(x))


# --- what the optimizers that fine-tune share ---------------------------------------------------------


class FineTuneConfig(OptimizerConfig):
    """Recovery after a lossy change (see :func:`maybe_fine_tune`) and the agreement guard."""

    epochs: int = Field(default=1, ge=0)
    """Passes over the fine-tuning samples; 0 switches fine-tuning off."""
    lr: float = Field(default=5e-4, gt=0)
    """Adam's initial learning rate (cosine-decayed to 0)."""
    batch_size: int = Field(default=128, ge=1)
    max_samples: int = Field(default=10_000, ge=1)
    """At most this many training samples (a seeded subset), to keep fine-tuning short."""
    seed: int = 0
    min_agreement: float | None = Field(default=0.9, gt=0, le=1)
    """Guard: the result must agree with its parent's top-1 on at least this fraction of held-out
    samples, else the change is made milder and tried again (up to 3 times; then an error).
    None switches the guard off."""


def maybe_fine_tune(
    module: torch.nn.Module,
    teacher: torch.nn.Module,
    spec: ModelSpec,
    ctx: OptimizeContext,
    config: FineTuneConfig,
    label: str,
) -> tuple[str, float]:
    """Recover the accuracy a lossy change cost, in place; returns (what was done, held-out agreement).

    With training data (labels): fine-tune on a seeded subset of at most ``max_samples``, and measure
    top-1 agreement with ``teacher`` (the unmodified parent) on the calibration samples, which are
    disjoint from the training data. Without: train ``module`` to reproduce ``teacher``'s outputs on
    two thirds of the calibration samples (for ``epochs × max_samples`` sample passes) and measure on
    the other third. ``epochs=0``: no training, agreement on all calibration samples.
    """
    import numpy as np
    import torch

    from optiserve.progress import Steps

    calibration = ctx.calibration(spec)
    data = ctx.training(spec) if config.epochs else None
    check = calibration
    if config.epochs == 0:
        x, y, epochs, what = calibration[:0], None, 0, "not fine-tuned (epochs=0)"
    elif data is not None:
        idx = np.sort(np.random.default_rng(config.seed).permutation(len(data[0]))[: config.max_samples])
        x, y, epochs, what = data[0][idx], data[1][idx], config.epochs, "fine-tuned on {n} labelled samples"
    else:
        cut = max(1, (2 * len(calibration)) // 3)
        x, check = calibration[:cut], calibration[cut:] if cut < len(calibration) else calibration
        with torch.inference_mode():
            y = teacher.eval()(torch.from_numpy(x)).numpy()
        epochs = config.epochs * max(1, config.max_samples // len(x))
        what = "trained to match the parent on {n} calibration samples"
    if epochs and y is not None:
        total = steps_for(len(x), epochs, config.batch_size)
        with Steps().task(f"{label}: {what.format(n=len(x))}", total=total) as advance:
            fine_tune(module, x, y, epochs, config.lr, config.batch_size, config.seed, on_step=advance)
    return what.format(n=len(x)), agreement(module, teacher, check)


def agreement(module: torch.nn.Module, reference: torch.nn.Module, x: np.ndarray) -> float:
    """Fraction of ``x`` on which both modules give the same top-1 class."""
    import torch

    with torch.inference_mode():
        a = module.eval()(torch.from_numpy(x)).argmax(1)
        b = reference.eval()(torch.from_numpy(x)).argmax(1)
    return float((a == b).float().mean())


def guarded(
    attempt: Callable[[float], tuple[torch.nn.Module, torch.nn.Module] | None],
    levels: list[float],
    spec: ModelSpec,
    ctx: OptimizeContext,
    config: FineTuneConfig,
    label: str,
) -> tuple[torch.nn.Module, float] | None:
    """Apply a lossy change at the first of ``levels`` (mildest last) whose result passes the guard.

    ``attempt(level)`` returns (changed module, unchanged parent), or None when there is nothing to
    change at that level. Returns (recovered module, level used), None if nothing changed, and raises
    an OptimizationError when even the mildest level fails ``min_agreement``.
    """
    from optiserve.errors import OptimizationError
    from optiserve.progress import Steps

    agreed = 1.0
    for level in levels if config.min_agreement is not None else levels[:1]:
        made = attempt(level)
        if made is None:
            return None
        module, teacher = made
        what, agreed = maybe_fine_tune(module, teacher, spec, ctx, config, label)
        if config.min_agreement is None or agreed >= config.min_agreement:
            return module, level
        Steps().note(
            f"{label}: at {level:.3g}, {what}, agrees with its parent on {agreed:.0%} of held-out "
            f"samples (< min_agreement {config.min_agreement}); trying a milder setting"
        )
    raise OptimizationError(
        f"{label}: even at {levels[-1]:.3g} the result agrees with its parent on only {agreed:.0%} "
        f"of held-out samples (min_agreement {config.min_agreement})",
        hint="give the model training data, lower min_agreement, or set it to null",
    )


# --- distillation from a teacher, no labels --------------------------------------------------------------


def soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    mse_weight: float = 0.0,
) -> torch.Tensor:
    """``kl_weight · T² · KL(softmax(t/T) ‖ softmax(s/T)) + mse_weight · MSE(s, t)``.

    The T² factor keeps the KL gradient's size independent of the temperature (Hinton et al., 2015).
    """
    import torch.nn.functional as F

    loss = student_logits.new_zeros(())
    if kl_weight:
        t = temperature
        kl = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        loss = loss + kl_weight * t * t * kl
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(student_logits, teacher_logits)
    return loss


def distill(
    student: Any,
    teacher: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    *,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    mse_weight: float = 0.0,
    mixup: float = 0.0,
    on_step: Callable[[], None] | None = None,
) -> list[float]:
    """Train ``student`` for ``steps`` Adam steps to reproduce ``teacher``'s outputs on ``x``; the losses.

    For models without labels: the targets are the teacher's logits, computed per batch (so that
    augmented inputs get their own targets); ``teacher`` maps a float32 batch to logits (numpy: an ONNX
    Runtime session or a torch module under ``inference_mode``). ``student`` needs ``parameters()``
    and ``__call__`` on a torch batch. Batches are a seeded shuffle per pass over ``x``; ``mixup > 0``
    replaces each batch by convex combinations of it and a shuffled copy, with Beta(mixup, mixup)
    weights. Cosine learning-rate schedule from ``lr`` to 0; deterministic (see :func:`deterministic`).
    """
    import numpy as np
    import torch

    if steps <= 0 or len(x) == 0:
        return []
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    with deterministic(seed):
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        order = rng.permutation(len(x))
        cursor = 0
        for _ in range(steps):
            if cursor + batch_size > len(order):
                order, cursor = rng.permutation(len(x)), 0
            idx = np.sort(order[cursor : cursor + batch_size])
            cursor += batch_size
            batch = np.ascontiguousarray(x[idx], dtype=np.float32)
            if mixup > 0:
                lam = rng.beta(mixup, mixup, size=(len(batch), 1, 1, 1)[: batch.ndim]).astype(np.float32)
                batch = lam * batch + (1 - lam) * batch[rng.permutation(len(batch))]
            target = torch.from_numpy(np.asarray(teacher(batch), dtype=np.float32))
            opt.zero_grad(set_to_none=True)
            loss = soft_target_loss(
                student(torch.from_numpy(batch)), target, temperature, kl_weight, mse_weight
            )
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step()
    return losses
