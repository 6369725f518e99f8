"""OpenVINO IR export, NNCF INT8 (plain and accuracy-controlled) and the OpenVINO runtime, on the tiny MLP.

The contract tests (test_optimizers.py, test_runtimes.py) already run every plugin; these check what
is specific to each: FP16 weights really are f16, INT8 IR really has quantizers, accuracy control
keeps its bound (or says it cannot), the runtime uses the threads it is given and f32 precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optiserve.errors import ArtifactError, OptimizationError
from optiserve.manifest import variant_dir
from optiserve.optimizers.base import OptimizeContext, Optimizer
from optiserve.services.runtimes.base import Runtime
from optiserve.types import ThreadSpec, Variant
from tests.conftest import random_inputs, torch_reference

pytest.importorskip("openvino")
pytest.importorskip("nncf")


def _ir_ops(variant: Variant, workdir: Path) -> list[Any]:
    import openvino as ov

    xml = variant_dir(workdir, variant.id) / variant.artifacts["model"].path
    return list(ov.Core().read_model(str(xml)).get_ops())


def _build(name: str, parent: Variant, workdir: Path, **config: object) -> Variant:
    child: Variant = Optimizer.get(name)(config).apply(parent, workdir, OptimizeContext(workdir, threads=1))
    return child


@pytest.fixture(scope="module")
def ir_fp32(onnx_source: Variant, variants_workdir: Path) -> Variant:
    return _build("openvino-fp32", onnx_source, variants_workdir)


def test_ir_lists_both_files_as_checksummed_artifacts(ir_fp32: Variant, variants_workdir: Path) -> None:
    assert {a.path for a in ir_fp32.artifacts.values()} == {"model.xml", "model.bin"}
    assert all(len(a.sha256) == 64 for a in ir_fp32.artifacts.values())
    assert ir_fp32.format == "openvino" and ir_fp32.precision == "fp32"


def test_fp16_ir_stores_f16_weights(ir_fp32: Variant, onnx_source: Variant, variants_workdir: Path) -> None:
    fp16 = _build("openvino-fp16", onnx_source, variants_workdir)
    assert fp16.precision == "fp16"
    f16 = [op for op in _ir_ops(fp16, variants_workdir) if op.get_type_name() == "Constant"]
    assert any(str(op.get_element_type()) == "<Type: 'float16'>" for op in f16)
    assert not any(
        str(op.get_element_type()) == "<Type: 'float16'>"
        for op in _ir_ops(ir_fp32, variants_workdir)
        if op.get_type_name() == "Constant"
    )
    assert fp16.artifacts["weights"].size_bytes < 0.6 * ir_fp32.artifacts["weights"].size_bytes


def test_int8_ir_has_fake_quantize_ops(ir_fp32: Variant, variants_workdir: Path) -> None:
    int8 = _build("nncf-int8", ir_fp32, variants_workdir)
    assert int8.precision == "int8"
    types = [op.get_type_name() for op in _ir_ops(int8, variants_workdir)]
    assert types.count("FakeQuantize") >= 2


@pytest.mark.parametrize(("config", "float_matmul"), [({"keep_first": 1}, 0), ({"keep_last": 1}, 1)])
def test_int8_keeps_the_first_or_last_compute_ops_in_float(
    config: dict[str, int], float_matmul: int, ir_fp32: Variant, variants_workdir: Path
) -> None:
    int8 = _build("nncf-int8", ir_fp32, variants_workdir, **config)
    import openvino as ov

    xml = variant_dir(variants_workdir, int8.id) / int8.artifacts["model"].path
    ordered = ov.Core().read_model(str(xml)).get_ordered_ops()
    matmuls = [op for op in ordered if op.get_type_name() == "MatMul"]
    fed_by_fake_quantize = [
        any(
            op.input_value(i).get_node().get_type_name() == "FakeQuantize" for i in range(op.get_input_size())
        )
        for op in matmuls
    ]
    assert fed_by_fake_quantize == [i != float_matmul for i in range(len(matmuls))]


def test_int8_refuses_a_scope_that_ignores_everything(ir_fp32: Variant, variants_workdir: Path) -> None:
    with pytest.raises(OptimizationError, match="quantized nothing"):
        _build("nncf-int8", ir_fp32, variants_workdir, ignored_types=("MatMul",))


def test_accuracy_control_keeps_its_bound_on_validation_data(
    ir_fp32: Variant, variants_workdir: Path
) -> None:
    """The drop is re-measured here, independently, on the validation part of the calibration samples."""
    from optiserve.models.resolve import dataset

    child = _build("nncf-int8-ac", ir_fp32, variants_workdir, max_drop=0.05, validation_fraction=0.5)
    samples, _ = dataset(ir_fp32.model, "calibration", 300)
    val = samples[150:]
    runtime = Runtime.get("openvino")(child, variant_dir(variants_workdir, child.id))
    runtime.load()
    agreement = float((runtime.infer_any(val).argmax(1) == torch_reference(val).argmax(1)).mean())
    assert agreement >= 1 - 0.05 - 1e-9
    assert "FakeQuantize" in {op.get_type_name() for op in _ir_ops(child, variants_workdir)}


def test_accuracy_control_reports_an_impossible_bound(ir_fp32: Variant, variants_workdir: Path) -> None:
    """max_drop 0 with a single allowed revert on a model whose every quantizer matters."""
    with pytest.raises(OptimizationError, match=r"could not keep|revert every quantizer"):
        _build(
            "nncf-int8-ac",
            ir_fp32,
            variants_workdir,
            max_drop=0.0,
            drop_type="absolute",
            max_num_iterations=1,
            activations_range_estimator="mean_quantile",
            validation_fraction=0.5,
            preset="performance",
            subset_size=8,
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_runtime_honours_threads_and_f32_precision(
    ir_fp32: Variant, variants_workdir: Path, threads: int
) -> None:
    runtime = Runtime.get("openvino")(
        ir_fp32, variant_dir(variants_workdir, ir_fp32.id), ThreadSpec(intra_op=threads)
    )
    runtime.load()
    assert runtime.compiled.get_property("INFERENCE_NUM_THREADS") == threads
    assert runtime.compiled.get_property("NUM_STREAMS") == 1
    assert str(runtime.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    x = random_inputs(9, seed=5)
    np.testing.assert_allclose(runtime.infer(x), torch_reference(x), atol=1e-5, rtol=1e-5)


def test_runtime_refuses_an_artifact_that_is_not_ir(ir_fp32: Variant, tmp_path: Path) -> None:
    (tmp_path / "model.xml").write_text("<net>not a model")
    (tmp_path / "model.bin").write_bytes(b"")
    runtime = Runtime.get("openvino")(ir_fp32, tmp_path)
    with pytest.raises(ArtifactError, match="OpenVINO cannot load"):
        runtime.load()
    assert not runtime.ready


def test_overflow_fix_auto_resolves_to_this_cpus_need_and_explicit_values_stay() -> None:
    from optiserve.hardware import int8_dot_product_saturates

    cls = Optimizer.get("nncf-int8")
    assert cls().config.overflow_fix == ("enable" if int8_dot_product_saturates() else "disable")
    assert cls({"overflow_fix": "first_layer_only"}).config.overflow_fix == "first_layer_only"
