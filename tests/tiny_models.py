"""Tiny seeded torch models for tests; ``tests.tiny_models:mlp`` is a valid ``--model`` reference."""

from __future__ import annotations

import torch
from torch import nn

N_IN, N_HIDDEN, N_OUT = 16, 32, 5


def mlp() -> nn.Module:
    """16 → 32 → 5, the same weights on every call."""
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.ReLU(), nn.Linear(N_HIDDEN, N_OUT)).eval()


def unexportable() -> torch.nn.Module:
    """A model with an op (complex eigenvalues) that torch's ONNX exporter cannot convert."""

    class Eigen(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            square = self.linear(x).reshape(-1, 2, 4)[:, :, :2]
            return torch.linalg.eigvals(square).real.reshape(x.shape[0], -1)

    torch.manual_seed(0)
    return Eigen().eval()


SLOW_S = 0.5


def slow_mlp() -> nn.Module:
    """``mlp()`` that takes SLOW_S seconds per batch: in-flight requests that outlive a SIGTERM."""
    import time

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(SLOW_S)
            return self.inner(x)  # type: ignore[no-any-return]

    return Slow().eval()
