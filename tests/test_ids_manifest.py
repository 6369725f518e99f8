"""Variant ids come from content; manifests refuse modified artifacts and hand-edited fields."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from optiserve.errors import ArtifactError
from optiserve.ids import slug, variant_id
from optiserve.manifest import VARIANT_FILE, load_variant, variant_dir
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.onnx_export import OnnxExport
from optiserve.optimizers.source import materialize_source
from optiserve.types import Variant
from tests.conftest import MLP_CALLABLE
from tests.tiny_models import N_IN


def test_variant_id_is_deterministic_and_readable() -> None:
    lineage = {"parent": "m.torch.abc123", "optimizer": "onnx-export", "config": {"opset": 18}}
    first = variant_id("My Model", ["onnx"], lineage)
    assert first == variant_id("My Model", ["onnx"], dict(reversed(lineage.items())))
    assert first.startswith("my-model.onnx.")
    assert slug("EfficientNet Lite/0") == "efficientnet-lite-0"


def test_variant_id_changes_with_the_lineage() -> None:
    base = {"parent": "m.torch.abc123", "optimizer": "onnx-export", "config": {"opset": 18}}
    changed = {**base, "config": {"opset": 17}}
    other_parent = {**base, "parent": "m.torch.def456"}
    ids = {variant_id("m", ["onnx"], x) for x in (base, changed, other_parent)}
    assert len(ids) == 3


def test_optimizer_child_id_changes_when_its_config_changes(torch_source: Variant) -> None:
    default = OnnxExport().child_id(torch_source)
    assert default == OnnxExport({}).child_id(torch_source)
    assert default != OnnxExport({"opset": 17}).child_id(torch_source)
    assert default != OnnxExport({"exporter": "torchscript"}).child_id(torch_source)


def test_source_variant_id_is_stable_and_follows_the_weights(
    torch_source: Variant, onnx_source: Variant, tmp_path: Path
) -> None:
    again = materialize_source(resolve_model(MLP_CALLABLE, input_shape=(N_IN,)), tmp_path)
    assert again.id == torch_source.id  # same model, another workdir: same id
    other_name = materialize_source(resolve_model(MLP_CALLABLE, input_shape=(N_IN,), name="other"), tmp_path)
    assert other_name.id != torch_source.id
    assert onnx_source.id != torch_source.id


def _copy_variant(variant: Variant, workdir: Path, tmp_path: Path) -> Path:
    """A private copy of a shared variant folder, safe to damage."""
    target = tmp_path / "variants" / variant.id
    shutil.copytree(variant_dir(workdir, variant.id), target)
    return target


def test_load_variant_accepts_an_untouched_copy(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    assert load_variant(_copy_variant(onnx_source, variants_workdir, tmp_path)) == onnx_source


def test_load_variant_refuses_a_modified_artifact(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    folder = _copy_variant(onnx_source, variants_workdir, tmp_path)
    model = folder / onnx_source.artifacts["model"].path
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte different
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_variant(folder)
    assert load_variant(folder, verify=False).id == onnx_source.id


def test_load_variant_refuses_a_missing_artifact(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    folder = _copy_variant(onnx_source, variants_workdir, tmp_path)
    (folder / onnx_source.artifacts["model"].path).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_variant(folder)


@pytest.mark.parametrize(
    ("field", "value"),
    [("parameters", "many"), ("format", "pickle"), ("artifacts", ["model.onnx"]), ("surprise", 1)],
)
def test_load_variant_refuses_a_hand_edited_manifest(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path, field: str, value: object
) -> None:
    folder = _copy_variant(onnx_source, variants_workdir, tmp_path)
    manifest = folder / VARIANT_FILE
    data = json.loads(manifest.read_text())
    data[field] = value
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=rf"not a valid Variant manifest: {field}"):
        load_variant(folder)


def test_load_variant_refuses_a_folder_named_after_another_id(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    folder = _copy_variant(onnx_source, variants_workdir, tmp_path)
    renamed = folder.rename(folder.with_name("mlp.onnx.000000"))
    with pytest.raises(ArtifactError, match="folder name must be the id"):
        load_variant(renamed)


def test_calibrated_variants_are_named_by_their_calibration_data(
    onnx_source: Variant, tmp_path: Path
) -> None:
    """`--quick` calibrates on fewer samples than a full run: the ids differ, nothing stale is reused."""
    from optiserve.optimizers.base import OptimizeContext
    from optiserve.optimizers.ort_int8_static import OrtInt8Static

    quick = OrtInt8Static().child_id(onnx_source, OptimizeContext(tmp_path, calibration_samples=128))
    full = OrtInt8Static().child_id(onnx_source, OptimizeContext(tmp_path, calibration_samples=300))
    again = OrtInt8Static().child_id(onnx_source, OptimizeContext(tmp_path, calibration_samples=300))
    assert quick != full and full == again
    assert OnnxExport().child_id(torch_source_like(onnx_source)) == OnnxExport().child_id(
        torch_source_like(onnx_source), OptimizeContext(tmp_path, calibration_samples=7)
    )  # an optimizer that does not calibrate is not named by calibration data


def torch_source_like(variant: Variant) -> Variant:
    return variant.model_copy(update={"format": "torch"})
