"""The first variant of every model: the source itself (torch weights, or the user's ONNX file).

Its id hashes the model spec and the weights' checksum, so two different checkpoints of the same
architecture never share an id.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path

from optiserve.artifacts import ONNX_MODEL, TORCH_WEIGHTS, parameter_count, save_torch_weights
from optiserve.errors import ArtifactError
from optiserve.fsutil import sha256_file, staging_dir
from optiserve.ids import variant_id
from optiserve.manifest import describe_artifact, load_variant, variant_dir, write_variant
from optiserve.models.resolve import build_torch_module
from optiserve.types import ArtifactFormat, ModelSpec, Variant


def materialize_source(spec: ModelSpec, workdir: Path) -> Variant:
    scratch = Path(tempfile.mkdtemp(prefix=".source.", dir=_ensure(workdir)))
    try:
        fmt: ArtifactFormat
        parameters: int | None = None
        if spec.source == "onnx":
            fmt, rel, name = "onnx", ONNX_MODEL, "model"
            shutil.copyfile(spec.ref, scratch / rel)
        else:
            fmt, rel, name = "torch", TORCH_WEIGHTS, "weights"
            module = build_torch_module(spec)
            save_torch_weights(module, scratch / rel)
            parameters = parameter_count(module)
        vid = variant_id(
            spec.name, [fmt], {"model": spec.model_dump(mode="json"), "sha256": sha256_file(scratch / rel)}
        )
        final = variant_dir(workdir, vid)
        if final.exists():
            try:
                return load_variant(final)
            except ArtifactError:
                pass
        with staging_dir(final) as out:
            shutil.move(str(scratch / rel), out / rel)
            variant = Variant(
                id=vid,
                model=spec,
                format=fmt,
                precision="fp32",
                artifacts={name: describe_artifact(out, rel)},
                parameters=parameters,
                created_at=dt.datetime.now(dt.UTC),
            )
            write_variant(out, variant)
        return variant
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _ensure(workdir: Path) -> Path:
    path = workdir / "variants"
    path.mkdir(parents=True, exist_ok=True)
    return path
