"""Hand-offs between stages on disk: ``<workdir>/variants/<id>/variant.json`` with a sha256 per artifact.

Any stage can be re-run alone from these files, and a corrupted or hand-edited artifact is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from optiserve.errors import ArtifactError
from optiserve.fsutil import atomic_write_text, sha256_file
from optiserve.types import Artifact, Variant

VARIANT_FILE = "variant.json"
M = TypeVar("M", bound=BaseModel)


def variants_dir(workdir: Path) -> Path:
    return workdir / "variants"


def variant_dir(workdir: Path, variant_id: str) -> Path:
    return variants_dir(workdir) / variant_id


def describe_artifact(variant_dir: Path, relpath: str) -> Artifact:
    path = variant_dir / relpath
    return Artifact(path=relpath, sha256=sha256_file(path), size_bytes=path.stat().st_size)


def write_model(path: Path, obj: BaseModel) -> None:
    atomic_write_text(path, obj.model_dump_json(indent=2) + "\n")


def read_model(path: Path, cls: type[M]) -> M:
    try:
        return cls.model_validate_json(path.read_bytes())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} does not exist", hint="run the stage that produces it first") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ArtifactError(f"{path} is not a valid {cls.__name__} manifest: {where}: {first['msg']}") from e


def write_variant(directory: Path, variant: Variant) -> None:
    write_model(directory / VARIANT_FILE, variant)


def load_variant(directory: Path, *, verify: bool = True) -> Variant:
    """Read a variant manifest and check every artifact's checksum (a modified artifact is refused)."""
    variant = read_model(directory / VARIANT_FILE, Variant)
    if directory.name != variant.id:
        raise ArtifactError(f"{directory} holds variant {variant.id!r}: the folder name must be the id")
    if verify:
        for name, art in variant.artifacts.items():
            path = directory / art.path
            if not path.is_file():
                raise ArtifactError(f"variant {variant.id}: artifact {name!r} is missing ({path})")
            actual = sha256_file(path)
            if actual != art.sha256:
                raise ArtifactError(
                    f"variant {variant.id}: artifact {name!r} ({path}) has sha256 {actual[:12]}…, "
                    f"the manifest says {art.sha256[:12]}…",
                    hint="it was modified or corrupted; re-run `optiserve optimize` to rebuild it",
                )
    return variant


def list_variants(workdir: Path) -> list[Variant]:
    root = variants_dir(workdir)
    if not root.is_dir():
        return []
    return [load_variant(d) for d in sorted(root.iterdir()) if (d / VARIANT_FILE).is_file()]
