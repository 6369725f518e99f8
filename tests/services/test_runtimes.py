"""Every registered runtime, serving the tiny model in its format, gives what torch gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optiserve.errors import ArtifactError
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
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load"):
        runtime.load()
    assert not runtime.ready
