"""Tiny seeded torch models for tests; ``tests.tiny_models:mlp`` is a valid ``--model`` reference."""

from __future__ import annotations

import torch
from torch import nn

N_IN, N_HIDDEN, N_OUT = 16, 32, 5


def mlp() -> nn.Module:
    """16 → 32 → 5, the same weights on every call."""
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.ReLU(), nn.Linear(N_HIDDEN, N_OUT)).eval()
