"""The optimizers that train (distill, qat-int8) on fashion-cnn, with tiny budgets; and that they are
skipped, with the reason, for models without training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from optiserve.config import ExperimentConfig, ModelConfig, OptimizerEntry
from optiserve.errors import ConfigError, OptimizationError
from optiserve.manifest import load_variant, variant_dir
from optiserve.models.fashion_cnn import FashionCnn
from optiserve.optimizers._students import width_scaled
from optiserve.optimizers.base import OptimizeContext
from optiserve.optimizers.distill import Distill, distillation_loss
from optiserve.optimizers.onnx_export import OnnxExport
from optiserve.optimizers.qat import QatInt8
from optiserve.optimizers.source import materialize_source
from optiserve.pipeline import optimize
from optiserve.progress import Steps
from optiserve.services.runtimes.onnxruntime_cpu import OnnxRuntimeCPU
from optiserve.services.runtimes.torch_eager import TorchEager
from optiserve.types import Variant
from tests.conftest import MLP_CALLABLE
from tests.tiny_models import N_IN

EVAL = 1000


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def ctx(workdir: Path) -> OptimizeContext:
    return OptimizeContext(workdir, calibration_samples=128)


@pytest.fixture(scope="module")
def fashion_source(workdir: Path) -> Variant:
    """The trained fashion-cnn (cached per machine, see optiserve.models.fashion_cnn)."""
    return materialize_source(FashionCnn.spec(), workdir)


@pytest.fixture(scope="module")
def eval_set() -> tuple[np.ndarray, np.ndarray]:
    return FashionCnn.dataset("eval", EVAL), FashionCnn.targets("eval", EVAL)


def top1(runtime_cls: type, variant: Variant, workdir: Path, data: tuple[np.ndarray, np.ndarray]) -> float:
    runtime = runtime_cls(variant, variant_dir(workdir, variant.id))
    runtime.load()
    x, y = data
    return float((runtime.infer_any(x).argmax(1) == y).mean())


@pytest.fixture(scope="module")
def student(fashion_source: Variant, workdir: Path, ctx: OptimizeContext) -> Variant:
    return Distill({"epochs": 2, "samples": 3000, "lr": 3e-3}).apply(fashion_source, workdir, ctx)


def test_distilled_student_is_smaller_and_learns(
    student: Variant, fashion_source: Variant, workdir: Path, eval_set: tuple[np.ndarray, np.ndarray]
) -> None:
    assert fashion_source.parameters is not None and student.parameters is not None
    assert student.parameters * 3 <= fashion_source.parameters
    assert student.format == "torch" and "architecture" in student.artifacts
    folder = variant_dir(workdir, student.id)
    assert load_variant(folder) == student  # every artifact's checksum
    log = json.loads((folder / student.artifacts["log"].path).read_text())
    assert log["parameters"] == student.parameters
    first, last = log["epoch_losses"]
    assert last < first, f"the distillation loss did not decrease: {log['epoch_losses']}"
    accuracy = top1(TorchEager, student, workdir, eval_set)  # rebuilt from architecture.json
    assert accuracy > 0.6, f"student top-1 {accuracy:.3f} on {EVAL} eval samples (chance is 0.1)"


def test_the_student_exports_to_onnx(
    student: Variant, workdir: Path, eval_set: tuple[np.ndarray, np.ndarray]
) -> None:
    onnx_child = OnnxExport({"exporter": "torchscript"}).apply(student, workdir)
    assert onnx_child.parameters == student.parameters
    assert top1(OnnxRuntimeCPU, onnx_child, workdir, eval_set) == pytest.approx(
        top1(TorchEager, student, workdir, eval_set), abs=0.002
    )


def test_qat_int8_has_qdq_nodes_runs_int8_kernels_and_keeps_accuracy(
    fashion_source: Variant,
    workdir: Path,
    ctx: OptimizeContext,
    eval_set: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    child = QatInt8({"samples": 1024, "calibration_samples": 64}).apply(fashion_source, workdir, ctx)
    assert (child.format, child.precision) == ("onnx", "int8")
    path = variant_dir(workdir, child.id) / child.artifacts["model"].path
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 4
    constants = {init.name: init.data_type for init in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t.data_type for n in graph.node if n.op_type == "Constant"})
    zero_point_types = {
        constants.get(n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
    }
    assert zero_point_types and zero_point_types <= {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    # With the settings the onnxruntime runtime uses, the QDQ pairs become INT8 kernels.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 2 and fused.count("QGemm") >= 1, fused
    fp32 = top1(TorchEager, fashion_source, workdir, eval_set)
    int8 = top1(OnnxRuntimeCPU, child, workdir, eval_set)
    assert int8 >= fp32 - 0.02, f"QAT INT8 top-1 {int8:.3f} vs FP32 {fp32:.3f} on {EVAL} samples"


def test_training_optimizers_are_skipped_for_models_without_training_data(tmp_path: Path) -> None:
    config = ExperimentConfig(
        model=ModelConfig(ref=MLP_CALLABLE, input_shape=(N_IN,)),
        workdir=tmp_path,
        optimizers=(OptimizerEntry(name="distill"), OptimizerEntry(name="qat-int8")),
    )
    from optiserve.pipeline import resolve

    variants, skipped = optimize(config, resolve(config), Steps(enabled=False))
    assert [v.parent_id for v in variants] == [None]  # only the source
    for name in ("distill", "qat-int8"):
        assert "no labelled training set" in skipped[name]


def test_without_training_data_produce_refuses(torch_source: Variant, tmp_path: Path) -> None:
    with pytest.raises(OptimizationError, match="no labelled training set"):
        Distill().apply(torch_source, tmp_path)


def test_configs_are_checked() -> None:
    with pytest.raises(ConfigError, match="distill: width"):
        Distill({"width": 0})
    with pytest.raises(ConfigError, match="distill: temprature"):
        Distill({"temprature": 2})
    with pytest.raises(ConfigError, match="qat-int8: epochs"):
        QatInt8({"epochs": 0})


def test_distillation_loss_terms() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    labels = logits.argmax(1)
    teacher = torch.log_softmax(logits / 2.0, dim=1)
    # A student equal to its teacher has no soft loss; with alpha=1 only the soft term counts.
    assert float(distillation_loss(logits, teacher, labels, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    hard = float(torch.nn.functional.cross_entropy(logits, labels))
    assert float(distillation_loss(logits, teacher, labels, 2.0, 0.0)) == pytest.approx(hard)
    other = torch.randn(8, 5)
    assert float(distillation_loss(other, teacher, labels, 2.0, 1.0)) > 0.01


def test_width_scaled_student_shapes() -> None:
    teacher = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )
    student = width_scaled(teacher, 0.5)
    assert [name for name, _ in student.named_modules()] == [name for name, _ in teacher.named_modules()]
    assert (student[0].out_channels, student[1].num_features, student[3].groups) == (4, 4, 4)
    assert (student[5].in_features, student[5].out_features, student[7].out_features) == (4 * 36, 16, 4)
    assert student(torch.randn(2, 3, 6, 6)).shape == (2, 4)
    with pytest.raises(OptimizationError, match="LayerNorm"):
        width_scaled(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), 0.5)
    with pytest.raises(OptimizationError, match="student\\(width\\) classmethod"):
        width_scaled(nn.LSTM(4, 8), 0.5)
