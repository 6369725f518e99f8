"""The built-in fashion-cnn: deterministic training, disjoint splits, a real accuracy floor, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from optiserve.models import fashion_cnn as F
from optiserve.models.base import BuiltinModel
from optiserve.optimizers._torch_train import accuracy

TINY = F.Recipe(samples=384, epochs=1, batch_size=64)
"""A training budget of 6 steps: enough to test determinism and the cache, in seconds."""


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_it_is_a_registered_builtin_with_a_28x28_input() -> None:
    cls = BuiltinModel.get("fashion-cnn")
    spec = cls.spec()
    assert spec.inputs[0].sample_shape == (1, 28, 28)
    assert spec.outputs[0].shape == (None, 10)
    assert len(cls.labels()) == 10


def test_training_is_deterministic() -> None:
    first = F.train(TINY, progress=False)
    second = F.train(TINY, progress=False)
    assert _same(first, second)
    other_seed = F.train(F.Recipe(samples=384, epochs=1, batch_size=64, seed=1), progress=False)
    assert not _same(first, other_seed)


def test_training_restores_global_torch_state() -> None:
    threads = torch.get_num_threads()
    F.train(F.Recipe(samples=64, epochs=1, batch_size=64), progress=False)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_splits_are_deterministic_and_disjoint() -> None:
    cls = F.FashionCnn
    n_eval = n_cal = 2000
    eval_idx = F._split_indices("eval", n_eval)
    cal_idx = F._split_indices("calibration", n_cal)
    assert not set(eval_idx.tolist()) & set(cal_idx.tolist())
    x = cls.dataset("eval", 50)
    assert x.shape == (50, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x, cls.dataset("eval", 50))
    np.testing.assert_array_equal(cls.targets("eval", 50), cls.targets("eval", 50))
    assert not np.array_equal(x, cls.dataset("calibration", 50))
    # training data comes from the other file: same class set, none of the test file's arrays
    tx, ty = cls.training_data()
    assert tx.shape[1:] == (1, 28, 28) and len(tx) == len(ty)
    assert set(np.unique(ty).tolist()) == set(range(10))
    assert len(tx) > len(F._raw()[0]["test"][0])


def test_asking_for_more_samples_than_a_split_holds_is_refused() -> None:
    from optiserve.errors import ModelError

    with pytest.raises(ModelError, match="eval samples"):
        F.FashionCnn.dataset("eval", 10**6)


def test_even_a_tiny_budget_learns_something() -> None:
    model = F.train(F.Recipe(samples=1536, epochs=1, batch_size=64), progress=False)
    x, y = F.FashionCnn.dataset("eval", 1000), F.FashionCnn.targets("eval", 1000)
    assert accuracy(model, x, y) >= 0.55  # chance is 0.10


def test_the_default_model_is_accurate_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real default recipe (trained once per machine, then read from the cache)."""
    model = F.FashionCnn.build()
    x, y = F.FashionCnn.dataset("eval", 2000), F.FashionCnn.targets("eval", 2000)
    floor = 0.87 if F.has_fashion_mnist() else 0.90
    assert accuracy(model, x, y) >= floor
    # the cache: a second call reads the file the first wrote (no training), and a corrupt file retrains
    monkeypatch.setenv("OPTISERVE_CACHE", str(tmp_path))
    first = F.trained(TINY, progress=False)
    (cached,) = tmp_path.glob("fashion-cnn-*.pt")
    mtime = cached.stat().st_mtime_ns
    assert _same(F.trained(TINY, progress=False), first)
    assert cached.stat().st_mtime_ns == mtime
    cached.write_bytes(b"not a state dict")
    assert _same(F.trained(TINY, progress=False), first)
    assert torch.load(cached, weights_only=True).keys() == first.state_dict().keys()
