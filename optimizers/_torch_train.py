"""A small, deterministic supervised training loop shared by the built-in models and the optimizers
that train (fine-tuning after pruning or factorization, distillation, quantization-aware training).

Deterministic means: the same module, data, hyper-parameters and seed give bit-identical weights on
the same machine. :func:`deterministic` seeds torch, switches on ``torch.use_deterministic_algorithms``
and fixes the thread count for the duration of a block, and restores all three afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

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
    """Recovery after a lossy change: see :func:`maybe_fine_tune`."""

    epochs: int = Field(default=1, ge=0)
    """Passes over the fine-tuning samples; 0 switches fine-tuning off."""
    lr: float = Field(default=5e-4, gt=0)
    """Adam's initial learning rate (cosine-decayed to 0)."""
    batch_size: int = Field(default=128, ge=1)
    max_samples: int = Field(default=10_000, ge=1)
    """At most this many training samples (a seeded subset), to keep fine-tuning short."""
    seed: int = 0


def maybe_fine_tune(
    module: torch.nn.Module,
    teacher: torch.nn.Module,
    spec: ModelSpec,
    ctx: OptimizeContext,
    config: FineTuneConfig,
    label: str,
) -> str:
    """Recover the accuracy a lossy change cost, in place; returns what was done, in words.

    With training data (labels): fine-tune on a seeded subset of at most ``max_samples``. Without:
    train ``module`` to reproduce ``teacher``'s outputs (the unmodified parent) on the calibration
    samples, for the same number of sample passes (``epochs × max_samples``). ``epochs=0``: nothing.
    """
    import numpy as np
    import torch

    from optiserve.progress import Steps

    if config.epochs == 0:
        return "not fine-tuned (epochs=0)"
    data = ctx.training(spec)
    if data is not None:
        x, y = data
        idx = np.sort(np.random.default_rng(config.seed).permutation(len(x))[: config.max_samples])
        x, y, epochs, what = x[idx], y[idx], config.epochs, "fine-tuned on {n} labelled samples"
    else:
        x = ctx.calibration(spec)
        with torch.inference_mode():
            y = teacher.eval()(torch.from_numpy(x)).numpy()
        epochs = config.epochs * max(1, config.max_samples // max(1, len(x)))
        what = "trained to match the parent on {n} calibration samples"
    total = steps_for(len(x), epochs, config.batch_size)
    with Steps().task(f"{label}: {what.format(n=len(x))}", total=total) as advance:
        fine_tune(module, x, y, epochs, config.lr, config.batch_size, config.seed, on_step=advance)
    return what.format(n=len(x))
