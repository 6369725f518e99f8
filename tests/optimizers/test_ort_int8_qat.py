"""ort-int8-qat (quantization-aware distillation of an ORT QDQ model) on a tiny convolutional ONNX model
with the layers EfficientNet-Lite0 has (asymmetric "same" padding, depthwise conv, ReLU6, residual
add, global mean, classifier); the distillation loss; the photo-restricted crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from optiserve.errors import OptimizationError
from optiserve.manifest import variant_dir
from optiserve.models.images import crop_photos, crops, photos
from optiserve.models.resolve import resolve_model
from optiserve.optimizers._torch_train import distill, soft_target_loss
from optiserve.optimizers.base import OptimizeContext
from optiserve.optimizers.ort_int8_qat import OrtInt8Qat, QdqModule
from optiserve.optimizers.ort_int8_static import OrtInt8Static
from optiserve.optimizers.source import materialize_source
from optiserve.types import Variant

CLASSES = 10


class TinyNet(nn.Module):
    """Stem (stride 2, asymmetric pad), a residual depthwise block with ReLU6, mean pool, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.expand = nn.Conv2d(8, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, CLASSES)
        # Depthwise channels of very different sizes (the project conv compensates): per-tensor INT8
        # weights then lose most of the small channels, an error worth removing.
        sizes = torch.logspace(-2, 0, 16)
        with torch.no_grad():
            self.depthwise.weight.mul_(sizes[:, None, None, None])
            self.depthwise.bias.mul_(sizes)
            self.project.weight.div_(sizes[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self.stem(nn.functional.pad(x, (0, 1, 0, 1))))
        y = nn.functional.relu6(self.depthwise(nn.functional.relu6(self.expand(x))))
        x = x + self.project(y)
        return self.head(x.mean(dim=(2, 3)))


def inputs(n: int, seed: int) -> np.ndarray:
    """Smooth random images (a low-resolution noise upsampled), so that the classes are not all ties."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.standard_normal((n, 3, 4, 4)).astype(np.float32))
    return nn.functional.interpolate(low, size=(16, 16), mode="bilinear").numpy()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qat")


@pytest.fixture(scope="module")
def source(workdir: Path) -> Variant:
    torch.manual_seed(0)
    path = workdir / "tiny.onnx"
    torch.onnx.export(
        TinyNet().eval(),
        (torch.from_numpy(inputs(2, 0)),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return materialize_source(resolve_model(str(path)), workdir)


@pytest.fixture(scope="module")
def ctx(workdir: Path) -> OptimizeContext:
    np.save(workdir / "samples.npy", inputs(256, 1))
    return OptimizeContext(workdir, calibration_samples=256, calibration_path=workdir / "samples.npy")


def model_path(variant: Variant, workdir: Path) -> Path:
    return variant_dir(workdir, variant.id) / variant.artifacts["model"].path


def run(path: Path, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["WeightBiasQuantization"]
    )
    return session.run(None, {"input": x})[0]  # type: ignore[no-any-return]


def test_qdq_module_computes_what_onnx_runtime_computes(
    source: Variant, workdir: Path, ctx: OptimizeContext
) -> None:
    ptq = OrtInt8Static().apply(source, workdir, ctx)
    quantized = onnx.load(str(model_path(ptq, workdir)))
    module = QdqModule(quantized, onnx.load(str(model_path(source, workdir))))
    x = inputs(64, 2)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    expected = run(model_path(ptq, workdir), x, optimize=False)
    # Same ops and roundings; only float summation order differs (and may flip a rare rounding).
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    # Untrained, the export writes back exactly the stored int8 weights and int32 biases.
    exported = {i.name: numpy_helper.to_array(i) for i in module.export().graph.initializer}
    for init in quantized.graph.initializer:
        np.testing.assert_array_equal(exported[init.name], numpy_helper.to_array(init), err_msg=init.name)


def test_qdq_module_splits_the_error_into_weight_and_activation_rounding(
    source: Variant, workdir: Path, ctx: OptimizeContext
) -> None:
    ptq = OrtInt8Static({"calibrate_method": "minmax"}).apply(source, workdir, ctx)
    quantized, float_model = (
        onnx.load(str(model_path(ptq, workdir))),
        onnx.load(str(model_path(source, workdir))),
    )
    x = ctx.calibration(source.model)[:64]  # inside the calibrated (min-max) ranges: nothing is clipped
    expected = run(model_path(source, workdir), x)
    size = float(np.abs(expected).max())

    def error(**quantize: bool) -> float:
        with torch.no_grad():
            got = QdqModule(quantized, float_model, **quantize)(torch.from_numpy(x)).numpy()
        return float(np.abs(got - expected).max()) / size

    assert error(quantize_weights=False, quantize_activations=False) < 1e-5  # the float model again
    assert error(quantize_weights=False) > 1e-3  # activation rounding alone
    assert error(quantize_activations=False) > 1e-3  # weight rounding alone
    with pytest.raises(OptimizationError, match="fully quantized"):
        QdqModule(quantized, float_model, quantize_weights=False).export()
    with pytest.raises(OptimizationError, match="need the float model"):
        QdqModule(quantized, quantize_weights=False)


def test_distillation_brings_the_int8_model_closer_to_fp32(
    source: Variant, workdir: Path, ctx: OptimizeContext
) -> None:
    # Per-tensor weights: a coarse starting point, so that there is an error to remove.
    base = {"ptq": {"calibrate_method": "minmax", "per_channel": False}, "holdout": 64, "steps": 0}
    start = OrtInt8Qat({**base, "reconstruct": False}).apply(source, workdir, ctx)
    rounded = OrtInt8Qat({**base, "reconstruct_iterations": 100}).apply(source, workdir, ctx)
    config = {**base, "reconstruct": False, "steps": 60, "lr": 1e-3, "batch_size": 32, "mse_weight": 1.0}
    distilled = OrtInt8Qat(config).apply(source, workdir, ctx)
    log = json.loads((variant_dir(workdir, distilled.id) / "qat.json").read_text())
    assert log["training_samples"] == 256 - 64 and log["onnx_vs_torch_top1_agreement"] >= 0.95
    assert log["loss_last_10"] < 0.5 * log["loss_first_10"]
    rounded_log = json.loads((variant_dir(workdir, rounded.id) / "qat.json").read_text())
    assert rounded_log["reconstructed_layers"] == 4  # the quantized convolutions, not the classifier
    assert rounded_log["layer_relative_mse_after"] <= rounded_log["layer_relative_mse_before"]
    x = inputs(256, 3)  # not the training samples
    reference = run(model_path(source, workdir), x)

    def error(variant: Variant) -> float:
        return float(np.mean((run(model_path(variant, workdir), x) - reference) ** 2))

    # On this model the layer-wise fit barely helps (activation rounding dominates each layer's error);
    # what it writes must still be a valid model no worse than the start.
    assert error(rounded) <= 1.02 * error(start)
    assert error(distilled) < 0.8 * error(start)
    # The exported graph is the post-training one with new weights: same nodes, fused by ORT alike.
    a, b = onnx.load(str(model_path(start, workdir))), onnx.load(str(model_path(distilled, workdir)))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert any(n.op_type == "QuantizeLinear" for n in b.graph.node)


@pytest.mark.parametrize("reduce_range", [True, False])
def test_training_keeps_the_weights_in_the_range_of_the_starting_point(
    reduce_range: bool, source: Variant, workdir: Path, ctx: OptimizeContext
) -> None:
    """7-bit weights (reduce_range, against saturating u8×s8 kernels) must stay 7-bit after training."""
    config = {
        "ptq": {"reduce_range": reduce_range},
        "holdout": 64,
        "steps": 30,
        "lr": 1e-2,
        "batch_size": 32,
        "reconstruct_iterations": 50,
    }
    trained = OrtInt8Qat(config).apply(source, workdir, ctx)
    assert trained.steps[-1].config["ptq"]["reduce_range"] is reduce_range
    model = onnx.load(str(model_path(trained, workdir)))
    int8 = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in int8) == (64 if reduce_range else 127)


def test_soft_target_loss() -> None:
    logits = torch.randn(4, CLASSES)
    assert float(soft_target_loss(logits, logits, temperature=3.0, mse_weight=1.0)) == pytest.approx(
        0, abs=1e-6
    )
    other = logits + torch.randn(4, CLASSES)
    kl = float(soft_target_loss(other, logits, temperature=1.0))
    assert kl > 0
    assert float(soft_target_loss(other, logits, kl_weight=0.0, mse_weight=1.0)) == pytest.approx(
        float(((other - logits) ** 2).mean()), rel=1e-5
    )


def test_distill_without_steps_leaves_the_student_alone() -> None:
    student = nn.Linear(3, 2)
    before = [p.detach().clone() for p in student.parameters()]
    assert distill(student, lambda x: x[:, :2], np.ones((4, 3), np.float32), 0, 1e-2, 2, 0) == []
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_distill_learns_a_teacher_with_mixup() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(3, 4)
    student = nn.Linear(3, 4)
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)

    def target(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return teacher(torch.from_numpy(batch)).numpy()

    losses = distill(student, target, x, 200, 0.05, 16, 0, mse_weight=1.0, mixup=0.4)
    assert len(losses) == 200 and np.mean(losses[-10:]) < 0.05 * np.mean(losses[:10])


def test_crops_restricted_to_photos_are_a_subsequence_of_the_split() -> None:
    n = 40
    everything = crops("calibration", n)
    assert len(crop_photos("calibration", n)) == n
    chosen = sorted(set(crop_photos("calibration", n)))[:2]
    only = crops("calibration", 5, photos=chosen)
    assert set(crop_photos("calibration", 5, photos=chosen)) <= set(chosen)
    from_chosen = [c for c, k in zip(everything, crop_photos("calibration", n), strict=True) if k in chosen]
    for a, b in zip(only, from_chosen, strict=False):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError):
        crops("eval", 1, photos=[len(photos()) + 5])
