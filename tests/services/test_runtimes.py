"""Every registered runtime, serving the tiny model in its format, gives what torch gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optiserve.errors import ArtifactError, ConfigError
from optiserve.manifest import variant_dir
from optiserve.services.runtimes.base import Runtime
from optiserve.types import Variant
from tests.conftest import random_inputs, torch_reference, variant_in_format


@pytest.mark.parametrize("name", sorted(Runtime.registry()))
def test_runtime_matches_torch(
    name: str, variants_by_format: dict[str, Variant], variants_workdir: Path
) -> None:
    runtime_cls = Runtime.get(name)
    if runtime_cls.needs_cuda and not runtime_cls.availability().ok:
        pytest.skip(f"{name}: {runtime_cls.availability().reason}")
    made = (variant_in_format(fmt, variants_by_format, variants_workdir) for fmt in runtime_cls.formats)
    servable = [v for v in made if v is not None]
    assert servable, f"{name} serves {runtime_cls.formats}; no optimizer chain makes them from the tiny model"
    for variant in servable:
        assert runtime_cls.serves(variant)
        runtime = runtime_cls(variant, variant_dir(variants_workdir, variant.id))
        assert not runtime.ready
        runtime.load()
        assert runtime.ready
        for batch in (1, 5):
            x = random_inputs(batch, seed=10 + batch)
            out = runtime.infer(x)
            assert out.shape == (batch, 5)
            np.testing.assert_allclose(out, torch_reference(x), atol=1e-5, rtol=1e-5)


def test_the_variant_runtime_matrix_follows_the_formats(variants_by_format: dict[str, Variant]) -> None:
    onnx, torch = variants_by_format["onnx"], variants_by_format["torch"]
    assert Runtime.get("onnxruntime").serves(onnx) and not Runtime.get("onnxruntime").serves(torch)
    assert Runtime.get("torch-eager").serves(torch) and not Runtime.get("torch-eager").serves(onnx)


def test_onnxruntime_refuses_an_artifact_that_is_not_onnx(onnx_source: Variant, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    runtime = Runtime.get("onnxruntime")(onnx_source, tmp_path)
    # Refused by the external-data check (optiserve.safeload), which parses the model first.
    with pytest.raises(ArtifactError, match="is not a readable ONNX model"):
        runtime.load()
    assert not runtime.ready


def test_an_unknown_runtime_option_is_a_config_error_naming_the_known_ones(
    onnx_source: Variant, variants_workdir: Path
) -> None:
    with pytest.raises(ConfigError, match="has no option warp_speed; known: execution_provider"):
        Runtime.get("onnxruntime")(
            onnx_source, variant_dir(variants_workdir, onnx_source.id), options={"warp_speed": 9}
        )


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_providers(provider: str, onnx_source: Variant, variants_workdir: Path) -> None:
    """Where the provider exists (onnxruntime-gpu on a CUDA machine) it serves; elsewhere a one-line
    config error names the providers this build has."""
    import onnxruntime as ort

    name = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    runtime = Runtime.get("onnxruntime")(
        onnx_source, variant_dir(variants_workdir, onnx_source.id), options={"execution_provider": provider}
    )
    if name not in ort.get_available_providers():
        with pytest.raises(
            ConfigError, match=f"this onnxruntime build has no {name} \\(it has .*CPUExecutionProvider"
        ):
            runtime.load()
        return
    runtime.load()
    x = random_inputs(4)
    np.testing.assert_allclose(runtime.infer(x), torch_reference(x), atol=1e-3, rtol=1e-3)


def test_openvino_device_option(variants_by_format: dict[str, Variant], variants_workdir: Path) -> None:
    import openvino as ov

    variant = variant_in_format("openvino", variants_by_format, variants_workdir)
    assert variant is not None
    where = variant_dir(variants_workdir, variant.id)
    cpu = Runtime.get("openvino")(variant, where, options={"device": "cpu"})
    cpu.load()
    x = random_inputs(3)
    np.testing.assert_allclose(cpu.infer(x), torch_reference(x), atol=1e-5, rtol=1e-5)
    if "GPU" not in ov.Core().available_devices:
        with pytest.raises(ConfigError, match="OpenVINO sees no GPU device"):
            Runtime.get("openvino")(variant, where, options={"device": "GPU"}).load()


def test_torch_compile_option_gives_what_eager_gives(
    variants_by_format: dict[str, Variant], variants_workdir: Path
) -> None:
    variant = variants_by_format["torch"]
    runtime = Runtime.get("torch-eager")(
        variant, variant_dir(variants_workdir, variant.id), options={"compile": True}
    )
    runtime.load()
    for batch in (1, 3):
        x = random_inputs(batch, seed=batch)
        np.testing.assert_allclose(runtime.infer(x), torch_reference(x), atol=1e-5, rtol=1e-5)
