"""Bring your own data: evaluation and calibration sets from the experiment file (``eval.data``,
``calibration.data``), in the forms users keep them.

- a folder of images with one sub-folder per class (the ImageFolder layout). A sub-folder's class index
  is its line number in a ``labels`` file (one class name per line, index 0 first; ``eval.labels``), or,
  without one, its position among the sorted sub-folder names;
- a ``.csv`` (with a header) or ``.jsonl`` of ``path,label`` (images; paths relative to the file) or
  ``text,label`` rows; a label is a class index, or a class name of the labels file or the model;
  or ``text1,text2,score`` rows: labelled text pairs (an STS set) for an embedding model;
- an ``.npz`` with ``x`` (preprocessed tensors, the model's input shape) and optionally ``y`` (labels).

Images go through the model's own preprocessing (built-ins), or through the one a user declares for an
ONNX image model (``model.preprocess``: resize the short side, centre-crop, mean/std, layout, colour
order), checked against the model's input shape. Every problem is one :class:`ConfigError` naming the
file and what was expected, raised before anything is written.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from optiserve.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from optiserve.types import ModelSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class Preprocess(BaseModel):
    """How an image becomes an ONNX image model's input (``model.preprocess``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize: int = Field(default=256, ge=1)
    """The short side is resized to this (bilinear), then the centre ``crop`` × ``crop`` is taken."""
    crop: int = Field(default=224, ge=1)
    mean: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    """Subtracted per channel, on the 0-255 scale."""
    std: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    """Divided per channel, on the 0-255 scale."""
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR"] = "RGB"

    def shape(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop) if self.layout == "NCHW" else (self.crop, self.crop, 3)

    def apply(self, image: Any) -> np.ndarray:
        import numpy as np
        from PIL import Image

        img = image.convert("RGB")
        w, h = img.size
        scale = self.resize / min(w, h)
        size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
        left, top = (img.size[0] - self.crop) // 2, (img.size[1] - self.crop) // 2
        pixels = np.asarray(img.crop((left, top, left + self.crop, top + self.crop)), dtype=np.float32)
        if self.color == "BGR":
            pixels = pixels[..., ::-1]
        scaled: np.ndarray = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(scaled.transpose(2, 0, 1) if self.layout == "NCHW" else scaled)


@dataclass(frozen=True)
class UserData:
    inputs: np.ndarray
    labels: np.ndarray | None
    """One class per sample; for text pairs, one gold score per pair (float)."""
    description: str
    keys: tuple[str, ...]
    """One per sample, to check that two sets share nothing: a resolved file path, or a digest."""
    pairs: bool = False
    """Text pairs: ``inputs`` holds every pair's first texts, then their second texts, in order."""


_CACHE: dict[tuple[str, ...], UserData] = {}


def load(
    path: Path,
    spec: ModelSpec,
    *,
    what: str,
    preprocess: Preprocess | None = None,
    labels_file: Path | None = None,
) -> UserData:
    """The samples of ``path`` as the model's input, with labels where the data has them (read once per
    process: the run checks the sets before any work, then evaluates and calibrates on them)."""
    key = (
        str(path.resolve()),
        spec.model_dump_json(),
        preprocess.model_dump_json() if preprocess else "",
        str(labels_file),
    )
    if key not in _CACHE:
        _CACHE[key] = _load(path, spec, what=what, preprocess=preprocess, labels_file=labels_file)
    return _CACHE[key]


def _load(
    path: Path,
    spec: ModelSpec,
    *,
    what: str,
    preprocess: Preprocess | None,
    labels_file: Path | None,
) -> UserData:
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file or folder")
    if path.is_dir():
        data = _image_folder(path, spec, what, preprocess, labels_file)
    elif path.suffix == ".npz":
        data = _npz(path, spec, what)
    elif path.suffix in (".csv", ".jsonl"):
        data = _table(path, spec, what, preprocess, labels_file)
    else:
        raise ConfigError(
            f"{what} {path}: expected an image folder (one sub-folder per class), a .csv/.jsonl of "
            "path,label or text,label rows, or an .npz with x (and y)"
        )
    _check_labels(data, spec, path, what)
    return data


def check_disjoint(evaluation: UserData, calibration: UserData, eval_path: Path, calib_path: Path) -> None:
    """Evaluation and calibration must not share a sample (a file, or identical tensors)."""
    shared = set(evaluation.keys) & set(calibration.keys)
    if shared:
        example = sorted(shared)[0]
        raise ConfigError(
            f"eval.data {eval_path} and calibration.data {calib_path} share {len(shared)} samples "
            f"(e.g. {example}): evaluate on data the quantizer never saw"
        )


def digests(inputs: np.ndarray) -> tuple[str, ...]:
    return tuple(hashlib.sha256(x.tobytes()).hexdigest()[:16] for x in inputs)


# --- the forms -------------------------------------------------------------------------------------------


def _image_folder(
    root: Path, spec: ModelSpec, what: str, preprocess: Preprocess | None, labels_file: Path | None
) -> UserData:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [
        (f, cls)
        for cls in classes
        for f in sorted((root / cls).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ConfigError(
            f"{what} {root}: no images (expected one sub-folder per class holding "
            f"{', '.join(IMAGE_SUFFIXES[:3])}... files)"
        )
    index = _class_index(spec, labels_file, classes, what)
    labels = []
    for _, cls in files:
        if cls not in index:
            raise ConfigError(f"{what} {root / cls}: class {cls!r} is not in the labels file {labels_file}")
        labels.append(index[cls])
    inputs = _images([f for f, _ in files], spec, what, preprocess)
    import numpy as np

    return UserData(
        inputs=inputs,
        labels=np.asarray(labels, dtype=np.int64),
        description=f"{len(files)} labelled images of {len(classes)} classes from {root}",
        keys=tuple(str(f.resolve()) for f, _ in files),
    )


def _npz(path: Path, spec: ModelSpec, what: str) -> UserData:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {path}: cannot read it as .npz ({e})") from e
    if "x" not in arrays:
        raise ConfigError(f"{what} {path}: no array named x (found: {', '.join(arrays) or 'none'})")
    x = arrays["x"]
    inp = spec.inputs[0]
    if x.ndim < 1 or len(x) == 0:
        raise ConfigError(f"{what} {path}: x is empty")
    if not inp.matches(tuple(x.shape[1:])):
        raise ConfigError(
            f"{what} {path}: x has samples of shape {tuple(x.shape[1:])}, the model takes {inp.describe()}"
        )
    y = arrays.get("y")
    if y is not None and (y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer)):
        raise ConfigError(
            f"{what} {path}: y must be one integer class per sample ({len(x)}), not {y.dtype} {y.shape}"
        )
    x = np.ascontiguousarray(x, dtype=inp.dtype)
    kind = "labelled " if y is not None else ""
    return UserData(
        inputs=x,
        labels=None if y is None else y.astype(np.int64),
        description=f"{len(x)} {kind}samples from {path}",
        keys=digests(x),
    )


def _table(
    path: Path, spec: ModelSpec, what: str, preprocess: Preprocess | None, labels_file: Path | None
) -> UserData:
    rows = _rows(path, what)
    columns = set(rows[0])
    if {"text1", "text2", "score"} <= columns:
        return _pairs(rows, path, spec, what)
    source = "path" if "path" in columns else "text" if "text" in columns else None
    if source is None or "label" not in columns:
        raise ConfigError(
            f"{what} {path}: expected columns path,label or text,label (or text1,text2,score) "
            f"(found: {', '.join(sorted(columns))})"
        )
    names = _label_names(spec, labels_file)
    labels = [_label(r.get("label"), names, path, i, what) for i, r in enumerate(rows)]
    import numpy as np

    if source == "path":
        files = [(path.parent / str(r["path"])) for r in rows]
        inputs = _images(files, spec, what, preprocess)
        keys = tuple(str(f.resolve()) for f in files)
    else:
        inputs = _texts([str(r["text"]) for r in rows], spec, what, path)
        keys = tuple(hashlib.sha256(str(r["text"]).encode()).hexdigest()[:16] for r in rows)
    return UserData(
        inputs=inputs,
        labels=np.asarray(labels, dtype=np.int64),
        description=f"{len(rows)} labelled {'images' if source == 'path' else 'texts'} from {path}",
        keys=keys,
    )


def _pairs(rows: list[dict[str, Any]], path: Path, spec: ModelSpec, what: str) -> UserData:
    """Labelled text pairs: the embeddings' cosine similarity is ranked against the gold scores."""
    import numpy as np

    if spec.task != "text-embedding":
        raise ConfigError(f"{what} {path}: text pairs with scores need an embedding model, not {spec.name}")
    scores = []
    for i, r in enumerate(rows):
        try:
            scores.append(float(r["score"]))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{what} {path}: row {i + 1}: score {r.get('score')!r} is not a number") from e
    if len(rows) < 3:
        raise ConfigError(f"{what} {path}: {len(rows)} pairs; a rank correlation needs at least 3")
    texts = [str(r["text1"]) for r in rows] + [str(r["text2"]) for r in rows]
    inputs = _texts(texts, spec, what, path)
    return UserData(
        inputs=inputs,
        labels=np.asarray(scores, dtype=np.float64),
        description=f"{len(rows)} scored text pairs from {path}",
        keys=tuple(hashlib.sha256(f"{r['text1']}\x00{r['text2']}".encode()).hexdigest()[:16] for r in rows),
        pairs=True,
    )


def _rows(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e})") from e
    rows: list[dict[str, Any]]
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{what} {path}: line {n} is not JSON ({e})") from e
            if not isinstance(row, dict):
                raise ConfigError(f"{what} {path}: line {n} is not a JSON object")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{what} {path}: no rows")
    return rows


def _label(value: Any, names: dict[str, int], path: Path, row: int, what: str) -> int:
    if value is None or str(value).strip() == "":
        raise ConfigError(f"{what} {path}: row {row + 1} has no label")
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if text in names:
        return names[text]
    raise ConfigError(
        f"{what} {path}: row {row + 1}: label {text!r} is neither a class index nor a class name"
    )


def _label_names(spec: ModelSpec, labels_file: Path | None) -> dict[str, int]:
    if labels_file is not None:
        return {name: i for i, name in enumerate(_read_labels_file(labels_file))}
    return {name: i for i, name in enumerate(spec.labels or ())}


def _class_index(spec: ModelSpec, labels_file: Path | None, classes: list[str], what: str) -> dict[str, int]:
    if labels_file is None:
        return {name: i for i, name in enumerate(classes)}  # sorted sub-folder order
    return {name: i for i, name in enumerate(_read_labels_file(labels_file))}


def _read_labels_file(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"eval.labels {path}: cannot read it ({e})") from e
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"eval.labels {path}: empty (expected one class name per line, index 0 first)")
    return names


def _images(files: list[Path], spec: ModelSpec, what: str, preprocess: Preprocess | None) -> np.ndarray:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from optiserve.models.base import BuiltinModel

    builtin = BuiltinModel.get(spec.ref) if spec.source == "builtin" else None
    if builtin is not None and builtin.raw_input != "image":
        raise ConfigError(f"{what}: {spec.name} does not take images")
    if builtin is None and preprocess is None:
        raise ConfigError(
            f"{what}: images need model.preprocess (resize, crop, mean, std, layout, color) to become "
            f"{spec.name}'s input {spec.inputs[0].describe()}"
        )
    if preprocess is not None and builtin is None and not spec.inputs[0].matches(preprocess.shape()):
        raise ConfigError(
            f"model.preprocess makes samples of shape {preprocess.shape()}, {spec.name} takes "
            f"{spec.inputs[0].describe()}"
        )
    out = []
    for f in files:
        try:
            if builtin is not None:
                out.append(builtin.from_raw([f.read_bytes()])[0])
            else:
                assert preprocess is not None
                with Image.open(f) as img:
                    out.append(preprocess.apply(img))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ConfigError(f"{what} {f}: not a readable image ({type(e).__name__}: {e})") from e
        except Exception as e:  # the built-ins' decoder raises its own 4xx errors
            raise ConfigError(f"{what} {f}: not a readable image ({e})") from e
    return np.ascontiguousarray(np.stack(out), dtype=spec.inputs[0].dtype)


def _texts(texts: list[str], spec: ModelSpec, what: str, path: Path) -> np.ndarray:
    from optiserve.models.base import BuiltinModel

    builtin = BuiltinModel.get(spec.ref) if spec.source == "builtin" else None
    if builtin is None or builtin.raw_input != "text":
        raise ConfigError(f"{what} {path}: text rows need a text model (a built-in such as minilm-l6)")
    return builtin.from_raw([t.encode() for t in texts])


def _check_labels(data: UserData, spec: ModelSpec, path: Path, what: str) -> None:
    if data.labels is None or data.pairs:
        return
    classes = spec.outputs[0].shape[-1] if spec.outputs and spec.outputs[0].shape else None
    bad = [int(y) for y in data.labels if y < 0 or (classes is not None and y >= classes)]
    if bad:
        limit = f"0-{classes - 1}" if classes is not None else ">= 0"
        raise ConfigError(
            f"{what} {path}: label {bad[0]} is outside the model's classes ({limit}); "
            f"{len(bad)} labels in all"
        )
