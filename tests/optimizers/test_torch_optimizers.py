"""prune-magnitude, prune-channels and lowrank-svd on real models: the tiny MLP, an untrained CNN with
fashion-cnn's architecture (a module:callable, so no training data), and the trained fashion-cnn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from optiserve.artifacts import ARCHITECTURE, load_torch_variant, parameter_count
from optiserve.errors import ArtifactError, OptimizationError
from optiserve.manifest import load_variant, variant_dir
from optiserve.models import fashion_cnn
from optiserve.models.resolve import resolve_model
from optiserve.optimizers._torch_train import accuracy
from optiserve.optimizers.base import OptimizeContext
from optiserve.optimizers.lowrank import LowRankSvd
from optiserve.optimizers.onnx_export import OnnxExport
from optiserve.optimizers.prune_channels import PruneChannels
from optiserve.optimizers.prune_magnitude import PruneMagnitude, sparsity
from optiserve.optimizers.source import materialize_source
from optiserve.types import Variant
from tests.conftest import MLP_CALLABLE
from tests.tiny_models import N_IN

HERE = "tests.optimizers.test_torch_optimizers"
NO_TRAINING = {"epochs": 0, "min_agreement": None}
"""Structural tests: the change alone, no recovery and no guard (fast, exact shapes)."""


def cnn() -> nn.Module:
    """fashion-cnn's architecture with seeded random weights (``tests...:cnn`` is a module:callable)."""
    torch.manual_seed(7)
    return fashion_cnn.architecture().eval()


class Branchy(nn.Module):
    """A residual block: not a Sequential, so prune-channels must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(N_IN, N_IN)
        self.b = nn.Linear(N_IN, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + torch.relu(self.a(x)))  # type: ignore[no-any-return]


def branchy() -> nn.Module:
    torch.manual_seed(0)
    return Branchy().eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch-opt")


@pytest.fixture(scope="module")
def cnn_source(work: Path) -> Variant:
    return materialize_source(resolve_model(f"{HERE}:cnn", input_shape=(1, 28, 28)), work)


@pytest.fixture(scope="module")
def mlp_source(work: Path) -> Variant:
    return materialize_source(resolve_model(MLP_CALLABLE, input_shape=(N_IN,)), work)


def _module(v: Variant, work: Path) -> nn.Module:
    return load_torch_variant(v, variant_dir(work, v.id))


def _onnx_bytes(v: Variant, work: Path) -> tuple[int, onnx.ModelProto]:
    child = OnnxExport().apply(v, work)
    path = variant_dir(work, child.id) / child.artifacts["model"].path
    return path.stat().st_size, onnx.load(str(path))


# --- prune-channels -------------------------------------------------------------------------------------


def test_prune_channels_really_removes_channels(cnn_source: Variant, work: Path) -> None:
    child = PruneChannels({"ratio": 0.5, **NO_TRAINING}).apply(cnn_source, work)
    module = _module(child, work)
    convs = [m for m in module if isinstance(m, nn.Conv2d)]
    linears = [m for m in module if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [16, 32]
    assert [bn.num_features for bn in module if isinstance(bn, nn.BatchNorm2d)] == [16, 32]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(32 * 49, 64), (64, 10)]
    assert child.parameters == parameter_count(module) < 0.3 * cnn_source.parameters  # type: ignore[operator]
    assert "architecture" in child.artifacts
    # the ONNX of the pruned model is smaller, and its convolutions really have fewer filters
    pruned_size, pruned_onnx = _onnx_bytes(child, work)
    full_size, _ = _onnx_bytes(cnn_source, work)
    assert pruned_size < 0.3 * full_size
    dims = sorted(tuple(i.dims) for i in pruned_onnx.graph.initializer if len(i.dims) == 4)
    assert dims == [(16, 1, 3, 3), (32, 16, 3, 3)]


def test_prune_channels_keeps_the_output_layer_and_is_exact_on_kept_paths(
    mlp_source: Variant, work: Path
) -> None:
    child = PruneChannels({"ratio": 0.5, **NO_TRAINING}).apply(mlp_source, work)
    first, _, last = _module(child, work)
    parent_first, _, parent_last = _module(mlp_source, work)
    assert (first.out_features, last.in_features, last.out_features) == (16, 16, 5)
    # the kept neurons are the largest-norm ones, with their weights copied unchanged
    norms = parent_first.weight.norm(dim=1)
    kept = torch.argsort(norms, descending=True)[:16].sort().values
    torch.testing.assert_close(first.weight, parent_first.weight[kept])
    torch.testing.assert_close(last.weight, parent_last.weight[:, kept])


def test_prune_channels_guard_backs_off_on_a_model_without_training_data(
    mlp_source: Variant, work: Path
) -> None:
    child = PruneChannels({"ratio": 0.5}).apply(mlp_source, work)  # default guard: min_agreement 0.9
    first, _, _ = _module(child, work)
    assert 16 < first.out_features < 32  # ratio 0.5 loses too much on a random MLP; a milder one is kept


def test_prune_channels_refuses_models_with_branches(work: Path) -> None:
    source = materialize_source(resolve_model(f"{HERE}:branchy", input_shape=(N_IN,)), work)
    with pytest.raises(OptimizationError, match="sequential"):
        PruneChannels(NO_TRAINING).apply(source, work)


# --- prune-magnitude ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_sparsity_matches_amount(scope: str, cnn_source: Variant, work: Path) -> None:
    child = PruneMagnitude({"amount": 0.6, "scope": scope, **NO_TRAINING}).apply(cnn_source, work)
    module = _module(child, work)
    assert sparsity(module) == pytest.approx(0.6, abs=0.005)
    if scope == "layer":
        for layer in module:
            if isinstance(layer, nn.Linear | nn.Conv2d):
                assert float((layer.weight == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    assert "architecture" not in child.artifacts  # same shapes as the model
    assert child.parameters == cnn_source.parameters
    assert not any(name.endswith(("_orig", "_mask")) for name in module.state_dict())  # masks baked


def test_magnitude_pruning_keeps_zeros_through_fine_tuning(mlp_source: Variant, work: Path) -> None:
    child = PruneMagnitude({"amount": 0.3, "epochs": 1, "min_agreement": None}).apply(mlp_source, work)
    module = _module(child, work)
    assert sparsity(module) == pytest.approx(0.3, abs=0.01)
    parent = _module(mlp_source, work)
    assert not torch.equal(module[0].bias, parent[0].bias)  # it was trained (to match the parent)


# --- lowrank-svd ------------------------------------------------------------------------------------------


def test_lowrank_target_ratio_sets_the_parameter_ratio(cnn_source: Variant, work: Path) -> None:
    child = LowRankSvd({"target_ratio": 0.25, **NO_TRAINING}).apply(cnn_source, work)
    module = _module(child, work)
    fc = module[9]
    assert isinstance(fc, nn.Sequential)
    first, second = fc
    rank = int(0.25 * 3136 * 128 // (3136 + 128))
    assert (first.in_features, first.out_features, second.out_features) == (3136, rank, 128)
    assert first.bias is None and second.bias is not None
    kept = first.weight.numel() + second.weight.numel()
    one_rank = (3136 + 128) / (3136 * 128)  # the ratio moves in steps of one rank
    assert 0.25 - one_rank < kept / (3136 * 128) <= 0.25
    assert module[11][0].out_features == int(0.25 * 128 * 10 // (128 + 10))  # the output layer too
    # the factors are the best rank-r approximation of the original weight
    original = _module(cnn_source, work)[9].weight.detach().double()
    approx = (second.weight @ first.weight).detach().double()
    s = torch.linalg.svdvals(original)
    expected = torch.sqrt((s[rank:] ** 2).sum())
    assert float(torch.linalg.norm(original - approx)) == pytest.approx(float(expected), rel=1e-3)


def test_lowrank_energy_bounds_the_relative_error(cnn_source: Variant, work: Path) -> None:
    child = LowRankSvd({"energy": 0.8, **NO_TRAINING}).apply(cnn_source, work)
    first, second = _module(child, work)[9]
    original = _module(cnn_source, work)[9].weight.detach()
    error = torch.linalg.norm(original - (second.weight @ first.weight).detach()) / torch.linalg.norm(
        original
    )
    assert float(error) <= (1 - 0.8) ** 0.5 + 1e-4


def test_lowrank_leaves_a_model_alone_when_nothing_would_shrink(mlp_source: Variant, work: Path) -> None:
    child = LowRankSvd({"energy": 0.99}).apply(mlp_source, work)
    for a, b in zip(_module(child, work).parameters(), _module(mlp_source, work).parameters(), strict=True):
        assert torch.equal(a, b)


# --- architecture.json ------------------------------------------------------------------------------------


def test_architecture_round_trips_through_a_chain(cnn_source: Variant, work: Path) -> None:
    """prune-channels, then lowrank-svd on the pruned model: both changes survive, outputs are exact."""
    pruned = PruneChannels({"ratio": 0.5, **NO_TRAINING}).apply(cnn_source, work)
    factored = LowRankSvd({"target_ratio": 0.3, **NO_TRAINING}).apply(pruned, work)
    folder = variant_dir(work, factored.id)
    assert load_variant(folder) == factored  # architecture.json is checksummed like the weights
    changes = json.loads((folder / ARCHITECTURE).read_text())["replace"]
    assert {c["path"] for c in changes} >= {"0", "4", "9"}
    module = _module(factored, work)
    assert module[0].out_channels == 16 and isinstance(module[9], nn.Sequential)
    assert module[9][0].in_features == 32 * 49
    # torch and ONNX of the rebuilt module agree (onnx-export checks it), and it is smaller still
    assert factored.parameters < pruned.parameters  # type: ignore[operator]
    OnnxExport().apply(factored, work)


def test_a_tampered_or_hostile_architecture_is_refused(
    cnn_source: Variant, work: Path, tmp_path: Path
) -> None:
    pruned = PruneChannels({"ratio": 0.5, **NO_TRAINING}).apply(cnn_source, work)
    copy_dir = tmp_path / "variants" / pruned.id
    shutil.copytree(variant_dir(work, pruned.id), copy_dir)
    arch = copy_dir / ARCHITECTURE
    data = json.loads(arch.read_text())
    data["replace"][0]["layer"] = {"type": "subprocess.Popen", "args": "true"}
    arch.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_variant(copy_dir)  # the checksum catches the edit first
    with pytest.raises(ArtifactError, match="not one of"):
        load_torch_variant(pruned, copy_dir)  # and the loader builds only known layer types
    data["replace"][0]["layer"] = {
        "type": "Linear",
        "in_features": "__import__('os')",
        "out_features": 1,
        "bias": 1,
    }
    arch.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="not a number"):
        load_torch_variant(pruned, copy_dir)


# --- the trained fashion-cnn ---------------------------------------------------------------------------


def test_channel_pruning_fine_tunes_fashion_cnn(work: Path) -> None:
    """The real built-in (cached training), pruned by half and fine-tuned briefly on its training split."""
    spec = fashion_cnn.FashionCnn.spec()
    source = materialize_source(spec, work)
    ctx = OptimizeContext(work, calibration_samples=200)
    child = PruneChannels({"ratio": 0.5, "epochs": 1, "max_samples": 2048}).apply(source, work, ctx)
    x = fashion_cnn.FashionCnn.dataset("eval", 1000)
    y = fashion_cnn.FashionCnn.targets("eval", 1000)
    base = accuracy(_module(source, work), x, y)
    pruned = _module(child, work)
    assert pruned[4].out_channels == 32
    assert accuracy(pruned, x, y) >= base - 0.06
    assert np.isfinite(child.parameters or 0) and child.parameters < 0.3 * source.parameters  # type: ignore[operator]
