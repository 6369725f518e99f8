"""`optiserve optimize`: the table, and the ways a step can fail without stopping the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optiserve.config import ExperimentConfig, OptimizerEntry
from optiserve.manifest import load_variant, read_model, variant_dir
from optiserve.models.resolve import resolve_model
from optiserve.pipeline import optimize
from optiserve.progress import Steps
from optiserve.types import Evaluation
from tests.conftest import error_lines, run_cli


def test_optimize_prints_every_variant_with_accuracy_latency_and_status(tmp_path: Path) -> None:
    done = run_cli(
        "optimize", "--model", "tests.tiny_models:mlp", "--input-shape", "16", "-w", tmp_path / "w",
        "--eval-samples", "32", cwd=Path.cwd(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for text in (
        "mlp.torch.",
        "mlp.onnx.",
        "torch-eager",
        "onnxruntime",
        "top-1 agree 100.0%",
        "p50 b=1",
        "ok",
    ):
        assert text in done.stdout, text
    assert sorted(p.name.split(".")[1] for p in (tmp_path / "w" / "variants").iterdir()) == ["onnx", "torch"]


def test_an_op_without_onnx_conversion_is_named_and_the_rest_goes_on(tmp_path: Path) -> None:
    done = run_cli(
        "optimize", "--model", "tests.tiny_models:unexportable", "--input-shape", "8", "-w", tmp_path / "w",
        "--eval-samples", "8", cwd=Path.cwd(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "aten.linalg_eig" in done.stdout and "skipped" in done.stdout
    variants = [p.name for p in (tmp_path / "w" / "variants").iterdir()]
    assert len(variants) == 1 and ".torch." in variants[0]  # no half-written ONNX variant


def test_an_empty_calibration_set_is_refused_before_any_work(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 16), dtype=np.float32))
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"model: {{ref: 'tests.tiny_models:mlp', input_shape: [16]}}\n"
        f"workdir: {tmp_path / 'w'}\n"
        f"optimizers: [{{name: onnx-export}}, {{name: ort-int8-static}}]\n"
        f"calibration: {{path: {empty}}}\n"
    )
    done = run_cli("optimize", config, cwd=Path.cwd())
    assert done.returncode == 2
    assert len(error_lines(done.stderr)) == 1 and "calibration set is empty" in done.stderr
    assert not (tmp_path / "w").exists()


def test_an_optimizer_whose_package_is_missing_is_skipped_with_the_install_hint(tmp_path: Path) -> None:
    config = ExperimentConfig(
        model={"ref": "tests.tiny_models:mlp", "input_shape": (16,)},  # type: ignore[arg-type]
        workdir=tmp_path,
        optimizers=(OptimizerEntry(name="onnx-export"), OptimizerEntry(name="tensorrt-fp16")),
    )
    spec = resolve_model("tests.tiny_models:mlp", input_shape=(16,))
    variants, skipped = optimize(config, spec, Steps(enabled=False))
    assert [v.format for v in variants] == ["torch", "onnx"]
    assert "pip install 'optiserve[tensorrt]'" in skipped["tensorrt-fp16"]


@pytest.mark.slow
def test_recommended_optimizers_of_the_default_model(tmp_path: Path) -> None:
    """What `make run` optimizes: ONNX, OpenVINO IR, and two INT8 variants, each evaluated and gated."""
    done = run_cli("optimize", "-w", tmp_path / "w", "--eval-samples", "16", cwd=Path.cwd(), timeout=900)
    assert done.returncode == 0, done.stderr
    variants = {load_variant(d).id: load_variant(d) for d in (tmp_path / "w" / "variants").iterdir()}
    kinds = sorted((v.format, v.precision) for v in variants.values())
    assert kinds == [
        ("onnx", "fp32"),
        ("onnx", "int8"),
        ("openvino", "fp32"),
        ("openvino", "int8"),
        ("torch", "fp32"),
    ]
    for variant in variants.values():
        (path,) = variant_dir(tmp_path / "w", variant.id).glob("evaluation.*.json")
        ev = read_model(path, Evaluation)
        assert ev.metric == "top1_accuracy" and ev.n_samples == 16 and ev.latency is not None
        assert ev.agreement is not None and ev.ratio_ci is not None
        if variant.precision == "fp32":
            assert ev.passed and ev.agreement == 1.0
        assert ev.passed == (ev.value >= 0.99 * ev.reference_value), "the gate is 0.99 × FP32's accuracy"
    rejected = [
        p
        for p in (tmp_path / "w" / "variants").glob("*/evaluation.*.json")
        if not read_model(p, Evaluation).passed
    ]
    assert ("rejected" in done.stdout) == bool(rejected)
