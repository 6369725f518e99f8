"""The ONNX / ONNX Runtime optimizers on the tiny MLP: what each really writes into the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from optiserve.errors import ConfigError
from optiserve.manifest import variant_dir
from optiserve.models.resolve import resolve_model
from optiserve.optimizers._ort_calibration import RANGE_CACHE
from optiserve.optimizers.base import OptimizeContext
from optiserve.optimizers.onnx_fp16 import OnnxFp16
from optiserve.optimizers.ort_graph_opt import OrtGraphOpt
from optiserve.optimizers.ort_int8_dynamic import OrtInt8Dynamic
from optiserve.optimizers.ort_int8_static import OrtInt8Static
from optiserve.optimizers.source import materialize_source
from optiserve.types import Variant
from tests.conftest import random_inputs, torch_reference

# The hand-built MLP's nodes are unnamed; the optimizers name them <OpType>_<index>.
FIRST_GEMM, SECOND_GEMM = "Gemm_0", "Gemm_2"


def model_of(variant: Variant, workdir: Path) -> onnx.ModelProto:
    return onnx.load(str(variant_dir(workdir, variant.id) / variant.artifacts["model"].path))


def run(variant: Variant, workdir: Path, x: np.ndarray) -> np.ndarray:
    path = variant_dir(workdir, variant.id) / variant.artifacts["model"].path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]  # type: ignore[no-any-return]


def quantized_weights(model: onnx.ModelProto) -> set[str]:
    """Names of the float weights that were replaced by int8 initializers feeding a DequantizeLinear."""
    int8 = {i.name for i in model.graph.initializer if i.data_type in (TensorProto.INT8, TensorProto.UINT8)}
    return {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}


def test_static_int8_writes_qdq_nodes_and_int8_weights_and_keeps_decisions(
    onnx_source: Variant, variants_workdir: Path
) -> None:
    child = OrtInt8Static().apply(onnx_source, variants_workdir)
    model = model_of(child, variants_workdir)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    assert len(quantized_weights(model)) == 2  # both Gemm weight matrices
    assert child.precision == "int8"
    x = random_inputs(256, seed=11)
    got, expected = run(child, variants_workdir, x), torch_reference(x)
    assert float((got.argmax(1) == expected.argmax(1)).mean()) >= 0.95
    assert not np.allclose(got, expected, atol=1e-6)  # really quantized, not a float copy


@pytest.mark.parametrize("reduce_range", [True, False])
def test_static_int8_reduce_range_limits_weights_to_7_bits_and_is_part_of_the_id(
    reduce_range: bool, onnx_source: Variant, variants_workdir: Path
) -> None:
    child = OrtInt8Static({"reduce_range": reduce_range}).apply(onnx_source, variants_workdir)
    model = model_of(child, variants_workdir)
    weights = [
        numpy_helper.to_array(i) for i in model.graph.initializer if i.name in quantized_weights(model)
    ]
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert largest == (64 if reduce_range else 127)  # per-channel scales use the whole (reduced) range
    assert child.steps[-1].config["reduce_range"] is reduce_range
    other = OrtInt8Static({"reduce_range": not reduce_range}).child_id(onnx_source)
    assert other != child.id


def test_reduce_range_auto_resolves_to_this_cpus_need() -> None:
    from optiserve.hardware import int8_dot_product_saturates

    assert OrtInt8Static().config.reduce_range is int8_dot_product_saturates()
    assert (
        OrtInt8Static({"reduce_range": "auto"}).config
        == OrtInt8Static({"reduce_range": int8_dot_product_saturates()}).config
    )


@pytest.mark.parametrize(
    "config",
    [
        {"nodes_to_exclude": [SECOND_GEMM]},
        {"keep_last": 1},
        {"keep_first": 1},
        {"op_types_to_exclude": ["Gemm"]},
    ],
)
def test_static_int8_keeps_excluded_nodes_in_float(
    config: dict[str, object], onnx_source: Variant, variants_workdir: Path
) -> None:
    model = model_of(OrtInt8Static(config).apply(onnx_source, variants_workdir), variants_workdir)
    gemms = {n.name: n for n in model.graph.node if n.op_type == "Gemm"}
    floats = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    expected_float = {
        "nodes_to_exclude": {SECOND_GEMM},
        "keep_last": {SECOND_GEMM},
        "keep_first": {FIRST_GEMM},
        "op_types_to_exclude": {FIRST_GEMM, SECOND_GEMM},
    }[next(iter(config))]
    for name, node in gemms.items():
        weight_is_float = node.input[1] in floats
        assert weight_is_float == (name in expected_float), f"{name}: float weight = {weight_is_float}"


def test_static_int8_refuses_an_unknown_node_name(onnx_source: Variant, variants_workdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"no node named 'Gemm_7'.*Gemm_0"):
        OrtInt8Static({"nodes_to_exclude": ["Gemm_7"]}).apply(onnx_source, variants_workdir)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "distribution"])
def test_static_int8_accepts_each_calibration_method(method: str) -> None:
    assert OrtInt8Static({"calibrate_method": method}).config.calibrate_method == method


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"calibrate_method": "kl"}, "calibrate_method"),
        ({"percentile": 100.5}, "percentile"),
        ({"calibration_samples": 0}, "calibration_samples"),
        ({"activation_type": "int4"}, "activation_type"),
        ({"nodes_to_exlude": ["x"]}, "nodes_to_exlude"),
    ],
)
def test_static_int8_refuses_bad_config(config: dict[str, object], where: str) -> None:
    with pytest.raises(ConfigError, match=f"optimizer ort-int8-static: {where}"):
        OrtInt8Static(config)


def test_static_int8_refuses_an_empty_calibration_set_before_writing_anything(
    onnx_source: Variant, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 16), dtype=np.float32))
    workdir = tmp_path / "work"
    optimizer = OrtInt8Static({"calibration_samples": 7})  # a config no other test builds
    with pytest.raises(ConfigError, match="calibration set is empty"):
        optimizer.apply(onnx_source, workdir, OptimizeContext(workdir, calibration_path=empty))
    assert not variant_dir(workdir, optimizer.child_id(onnx_source)).exists()
    assert not list((workdir / "variants").glob(".*")), "a staging directory was left behind"


def hidden_scale(model: onnx.ModelProto) -> float:
    """The scale of the QuantizeLinear of the hidden activations (between the two Gemms)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "hr")
    return float(inits[q.input[1]])


def widen_ranges(path: Path, factor: float) -> None:
    """Multiply every calibrated range in ORT's cache file by ``factor``."""
    data = json.loads(path.read_text())
    for tensor in data["data"].values():
        for end in ("lowest", "highest"):
            if isinstance(tensor[end], dict):
                tensor[end]["data"] *= factor
            else:
                tensor[end] *= factor
    path.write_text(json.dumps(data))


def test_static_int8_reuses_calibrated_ranges_when_only_the_float_nodes_change(
    mlp_onnx: Path, tmp_path: Path
) -> None:
    source = materialize_source(resolve_model(str(mlp_onnx)), tmp_path)
    first = model_of(OrtInt8Static().apply(source, tmp_path), tmp_path)
    (cache,) = (tmp_path / RANGE_CACHE).glob("*.json")
    widen_ranges(cache, 100.0)  # a build that calibrated again would not see this
    second = model_of(OrtInt8Static({"keep_last": 1}).apply(source, tmp_path), tmp_path)
    assert hidden_scale(second) == pytest.approx(100 * hidden_scale(first), rel=1e-3)

    cache.write_text("{half-written")  # unreadable: calibrated again, and the cache replaced
    third = model_of(OrtInt8Static({"keep_first": 1}).apply(source, tmp_path), tmp_path)
    assert hidden_scale(third) == pytest.approx(hidden_scale(first), rel=1e-6)
    assert json.loads(cache.read_text())["data"]
    # Other calibration settings are other ranges: a second cache entry.
    OrtInt8Static({"calibrate_method": "minmax"}).apply(source, tmp_path)
    assert len(list((tmp_path / RANGE_CACHE).glob("*.json"))) == 2


def test_quantizers_refuse_a_graph_ort_already_fused(onnx_source: Variant, variants_workdir: Path) -> None:
    fused = OrtGraphOpt().apply(onnx_source, variants_workdir)
    assert fused.precision == "fp32"
    for optimizer in (OrtInt8Static(), OrtInt8Dynamic(), OnnxFp16()):
        assert optimizer.accepts(onnx_source)
        assert not optimizer.accepts(fused)


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_ort_optimize_levels_keep_outputs(level: str, onnx_source: Variant, variants_workdir: Path) -> None:
    child = OrtGraphOpt({"level": level}).apply(onnx_source, variants_workdir)
    x = random_inputs(9, seed=5)
    np.testing.assert_allclose(run(child, variants_workdir, x), torch_reference(x), atol=1e-4, rtol=1e-4)


def test_dynamic_int8_turns_the_linear_layers_into_integer_matmuls(
    onnx_source: Variant, variants_workdir: Path
) -> None:
    child = OrtInt8Dynamic().apply(onnx_source, variants_workdir)
    ops = [n.op_type for n in model_of(child, variants_workdir).graph.node]
    assert ops.count("MatMulInteger") == 2 and "Gemm" not in ops
    kept = OrtInt8Dynamic({"nodes_to_exclude": [SECOND_GEMM]}).apply(onnx_source, variants_workdir)
    ops = [n.op_type for n in model_of(kept, variants_workdir).graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("MatMul") == 1


def test_fp16_halves_the_weights_but_keeps_float32_io(onnx_source: Variant, variants_workdir: Path) -> None:
    child = OnnxFp16().apply(onnx_source, variants_workdir)
    model = model_of(child, variants_workdir)
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.dims]
    assert weights and all(w.dtype == np.float16 for w in weights)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = random_inputs(32, seed=2)
    got = run(child, variants_workdir, x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, torch_reference(x), atol=1e-2, rtol=1e-2)
    assert child.precision == "fp16"


def test_bias_correction_rewrites_int32_biases_and_removes_the_mean_output_error(
    onnx_source: Variant, variants_workdir: Path
) -> None:
    plain = OrtInt8Static({"bias_correction": False}).apply(onnx_source, variants_workdir)
    corrected = OrtInt8Static().apply(onnx_source, variants_workdir)

    def int32_biases(v: Variant) -> dict[str, np.ndarray]:
        inits = model_of(v, variants_workdir).graph.initializer
        return {i.name: numpy_helper.to_array(i) for i in inits if i.data_type == TensorProto.INT32}

    before, after = int32_biases(plain), int32_biases(corrected)
    assert before.keys() == after.keys() and {"b1_quantized", "b2_quantized"} <= before.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    x = random_inputs(2000, seed=21)
    expected = torch_reference(x)
    bias_before = np.abs((run(plain, variants_workdir, x) - expected).mean(axis=0)).sum()
    bias_after = np.abs((run(corrected, variants_workdir, x) - expected).mean(axis=0)).sum()
    assert bias_after < 0.7 * bias_before, (bias_before, bias_after)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_in_strides_quantizes(
    method: str, onnx_source: Variant, variants_workdir: Path
) -> None:
    """45 samples calibrate in 3 strides of 15 (bounded memory); the ranges still give a working model."""
    child = OrtInt8Static({"calibrate_method": method, "calibration_samples": 45}).apply(
        onnx_source, variants_workdir
    )
    assert len(quantized_weights(model_of(child, variants_workdir))) == 2
    x = random_inputs(256, seed=12)
    agreement = float((run(child, variants_workdir, x).argmax(1) == torch_reference(x).argmax(1)).mean())
    assert agreement >= 0.9


def test_empirical_bias_correction_removes_the_mean_error_left_by_activation_quantization(
    mlp_onnx: Path, tmp_path: Path
) -> None:
    """Clipped activation ranges (percentile 99) shift the output mean in a way the weight-only correction
    cannot see; the layer-by-layer measured correction removes it on the calibration data."""
    workdir = tmp_path / "work"
    source = materialize_source(resolve_model(str(mlp_onnx)), workdir)
    x = random_inputs(512, seed=31)
    np.save(tmp_path / "calib.npy", x)
    ctx = OptimizeContext(workdir, calibration_path=tmp_path / "calib.npy")
    clipped = {"percentile": 99.0, "calibration_samples": 512}
    weight_only = OrtInt8Static(clipped).apply(source, workdir, ctx)
    empirical = OrtInt8Static(
        {**clipped, "empirical_bias_correction": True, "bias_correction_samples": 512}
    ).apply(source, workdir, ctx)
    expected = torch_reference(x)
    before = np.abs((run(weight_only, workdir, x) - expected).mean(axis=0)).sum()
    after = np.abs((run(empirical, workdir, x) - expected).mean(axis=0)).sum()
    assert after < 0.5 * before, (before, after)  # 0.29 measured; 1.0 without it


def test_empirical_bias_correction_refuses_zero_samples() -> None:
    with pytest.raises(ConfigError, match="optimizer ort-int8-static: bias_correction_samples"):
        OrtInt8Static({"empirical_bias_correction": True, "bias_correction_samples": 0})
