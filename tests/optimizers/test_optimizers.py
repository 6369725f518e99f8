"""Every registered optimizer, applied to the tiny model: verified artifacts, torch-equal outputs, caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from optiserve.errors import ConfigError
from optiserve.manifest import load_variant, variant_dir
from optiserve.optimizers.base import OptimizeContext, Optimizer
from optiserve.optimizers.onnx_export import OnnxExport
from optiserve.services.runtimes.base import runtimes_for
from optiserve.types import Variant
from tests.conftest import parent_for, random_inputs, torch_reference

# Defaults are tuned for real models; on the tiny MLP, NNCF's accuracy control with the default 1-point
# bound reverts every quantizer on CPUs without VNNI (7-bit weights), which it reports as an error.
TINY_MODEL_CONFIGS: dict[str, dict[str, object]] = {"nncf-int8-ac": {"max_drop": 0.05}}


@pytest.fixture(scope="module", params=sorted(Optimizer.registry()))
def optimized(
    request: pytest.FixtureRequest, variants_by_format: dict[str, Variant], variants_workdir: Path
) -> tuple[Optimizer, Variant, Variant]:
    """(optimizer, parent, child): each optimizer applied once to a source variant of the tiny model."""
    cls = Optimizer.get(request.param)
    if cls.needs_cuda and not cls.availability().ok:
        pytest.skip(f"{cls.name}: {cls.availability().reason}")
    if cls.needs_training_data:
        pytest.skip(f"{cls.name} trains: the tiny model has no training data (test_training_optimizers.py)")
    optimizer = cls(TINY_MODEL_CONFIGS.get(cls.name))
    parent = parent_for(optimizer, variants_by_format, variants_workdir)
    return optimizer, parent, optimizer.apply(parent, variants_workdir)


def test_child_manifest_and_artifacts_verify(
    optimized: tuple[Optimizer, Variant, Variant], variants_workdir: Path
) -> None:
    optimizer, parent, child = optimized
    assert child.parent_id == parent.id
    assert child.steps[-1].optimizer == optimizer.name
    assert child.id == optimizer.child_id(parent, OptimizeContext(variants_workdir))
    assert load_variant(variant_dir(variants_workdir, child.id)) == child  # checks every sha256


def test_child_outputs_match_torch(
    optimized: tuple[Optimizer, Variant, Variant], variants_workdir: Path
) -> None:
    _, _, child = optimized
    runtimes = [rt for rt in runtimes_for(child) if rt.availability().ok]
    assert runtimes, f"no available runtime serves {child.format}"
    x = random_inputs(64, seed=3)
    expected = torch_reference(x)
    optimizer, _, _ = optimized
    for runtime_cls in runtimes:
        runtime = runtime_cls(child, variant_dir(variants_workdir, child.id))
        runtime.load()
        got = runtime.infer_any(x)
        assert got.shape == expected.shape
        if optimizer.lossy:
            # Quantized, pruned, factorized, ...: the same decisions on nearly every input, not equal numbers.
            agreement = float((got.argmax(1) == expected.argmax(1)).mean())
            assert agreement >= 0.85, (
                f"{optimizer.name} on {runtime_cls.name}: top-1 agreement {agreement:.2f}"
            )
        else:
            tol = 1e-4 if child.precision == "fp32" else 2e-2
            np.testing.assert_allclose(got, expected, atol=tol, rtol=tol)


def test_reapplying_returns_the_cached_variant(
    optimized: tuple[Optimizer, Variant, Variant], variants_workdir: Path
) -> None:
    optimizer, parent, child = optimized
    folder = variant_dir(variants_workdir, child.id)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = type(optimizer)(TINY_MODEL_CONFIGS.get(optimizer.name)).apply(parent, variants_workdir)
    assert again == child  # same id, and created_at proves it was not rebuilt
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


def test_a_corrupted_cached_variant_is_rebuilt(
    optimized: tuple[Optimizer, Variant, Variant], variants_workdir: Path
) -> None:
    optimizer, parent, child = optimized
    artifact = variant_dir(variants_workdir, child.id) / next(iter(child.artifacts.values())).path
    artifact.write_bytes(b"corrupted")
    rebuilt = type(optimizer)(TINY_MODEL_CONFIGS.get(optimizer.name)).apply(parent, variants_workdir)
    assert rebuilt.id == child.id
    assert rebuilt.created_at > child.created_at
    load_variant(variant_dir(variants_workdir, child.id))  # verifies again


def test_onnx_export_has_a_dynamic_batch_axis(torch_source: Variant, variants_workdir: Path) -> None:
    child = OnnxExport().apply(torch_source, variants_workdir)
    path = variant_dir(variants_workdir, child.id) / child.artifacts["model"].path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 7):
        x = random_inputs(batch, seed=batch)
        (out,) = session.run(None, {name: x})
        assert out.shape == (batch, 5)
        np.testing.assert_allclose(out, torch_reference(x), atol=1e-4, rtol=1e-4)


def test_onnx_export_refuses_unknown_config_keys() -> None:
    with pytest.raises(ConfigError, match="optimizer onnx-export: opste"):
        OnnxExport({"opste": 17})


def test_int8_variants_record_the_cpu_features_they_were_tuned_on(
    onnx_source: Variant, variants_workdir: Path
) -> None:
    from optiserve.hardware import int8_cpu_features

    child = Optimizer.get("ort-int8-dynamic")({}).apply(onnx_source, variants_workdir)
    assert child.precision == "int8"
    assert child.cpu_features == int8_cpu_features()
    assert load_variant(variant_dir(variants_workdir, child.id)).cpu_features == child.cpu_features
    assert onnx_source.cpu_features is None  # float variants are not tied to a CPU
