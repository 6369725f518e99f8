"""A small CNN that optiserve trains itself, deterministically, on Fashion-MNIST (28×28 grey, 10 classes).

Data: Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/*.gz``, IDX
format; ``apt-get install dataset-fashion-mnist``). Where it is missing, scikit-learn's ``load_digits``
stands in: its 8×8 images (values 0..16) are scaled to 0..255, upsampled 3× (nearest) to 24×24 and
zero-padded to 28×28, so the model, its input spec and every optimizer stay the same; the labels are
then the digits 0..9. ``FASHION_MNIST_DIR`` points to another folder with the four IDX files.

Splits, all deterministic and disjoint:
  * training (``training_data()``, and the model's own training): the train file (60,000 images);
  * eval and calibration: a seeded permutation of the test file (10,000 images), the first half for
    eval and the second half for calibration.

Training is seeded, uses deterministic algorithms and a fixed thread count (see
:mod:`optiserve.optimizers._torch_train`), and runs once per machine: the weights are cached in
``$OPTISERVE_CACHE`` (default ``~/.cache/optiserve/``) under a name keyed by a hash of the training
recipe and of the dataset files, written atomically and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from optiserve.errors import ModelError
from optiserve.models.base import BuiltinModel, Split
from optiserve.types import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import numpy as np
    import torch

SIDE = 28
N_CLASSES = 10
MEAN, STD = 0.2860, 0.3530
"""Fashion-MNIST's pixel mean and standard deviation (of x / 255), used for both data sources."""
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SPLIT_SEED = 2024


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (with the data); its hash names the cache file."""

    samples: int = 20_000
    """Training images used (the first ``samples`` of a seeded permutation of the train file)."""
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    width: tuple[int, int] = (32, 64)
    hidden: int = 128
    version: int = 1
    """Bump when the training code changes in a way that changes the weights."""

    def key(self, data_checksum: str) -> str:
        text = json.dumps({**dataclasses.asdict(self), "data": data_checksum}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def architecture(width: tuple[int, int] = (32, 64), hidden: int = 128) -> torch.nn.Sequential:
    """conv3×3(1→32)-BN-ReLU-pool, conv3×3(32→64)-BN-ReLU-pool, flatten, FC(64·7·7→128)-ReLU, FC(128→10).

    A plain Sequential of standard layers, so channel pruning and low-rank factorization can reshape it.
    """
    from torch import nn

    c1, c2 = width
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (SIDE // 4) ** 2, hidden),
        nn.ReLU(),
        nn.Linear(hidden, N_CLASSES),
    )


# --- data -------------------------------------------------------------------------------------------


def data_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR", str(DEFAULT_DIR)))


def has_fashion_mnist() -> bool:
    return all((data_dir() / f).is_file() for pair in FILES.values() for f in pair)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    import numpy as np

    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise ModelError(f"cannot read {path}: {e}", hint="reinstall dataset-fashion-mnist") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ModelError(f"{path} is not an IDX file (magic {raw[:4].hex()})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ModelError(f"{path}: {data.size} bytes of data, the header says {dims}")
    return data.reshape(dims)


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, str]:
    """({"train": (uint8 images N×28×28, labels), "test": ...}, checksum, description), read once."""
    import numpy as np

    if has_fashion_mnist():
        digest = hashlib.sha256()
        splits = {}
        for split, (images, labels) in FILES.items():
            for name in (images, labels):
                digest.update((data_dir() / name).read_bytes())
            x = _read_idx(data_dir() / images, 0x803)
            y = _read_idx(data_dir() / labels, 0x801)
            if len(x) != len(y) or x.shape[1:] != (SIDE, SIDE):
                raise ModelError(f"{data_dir()}: {split} images {x.shape} do not match labels {y.shape}")
            splits[split] = (x, y.astype(np.int64))
        return splits, "fashion-mnist:" + digest.hexdigest(), "Fashion-MNIST"
    from sklearn.datasets import load_digits

    digits = load_digits()
    img = np.kron(digits.images * (255.0 / 16.0), np.ones((3, 3)))  # 8×8 → 24×24, nearest
    img = np.pad(img, ((0, 0), (2, 2), (2, 2))).round().clip(0, 255).astype(np.uint8)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(img))
    n_test = len(img) // 3
    test, train = perm[:n_test], perm[n_test:]
    checksum = "sklearn-digits:" + hashlib.sha256(img.tobytes() + y.tobytes()).hexdigest()
    return {"train": (img[train], y[train]), "test": (img[test], y[test])}, checksum, "scikit-learn digits"


def _normalize(images: np.ndarray) -> np.ndarray:
    import numpy as np

    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)


def _split_indices(split: Split, n: int) -> np.ndarray:
    import numpy as np

    (test_x, _) = _raw()[0]["test"]
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(test_x))
    half = len(perm) // 2
    pool = perm[:half] if split == "eval" else perm[half:]
    if n > len(pool):
        raise ModelError(
            f"fashion-cnn has {len(pool)} {split} samples ({_raw()[2]}); {n} were asked for",
            hint=f"ask for at most {len(pool)}",
        )
    return pool[:n]


def training_set(samples: int | None = None, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) from the train file: a seeded permutation, the first ``samples`` (all: None)."""
    import numpy as np

    x, y = _raw()[0]["train"]
    perm = np.random.default_rng(seed).permutation(len(x))[:samples]
    return _normalize(x[perm]), y[perm]


# --- training and the cache -------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("OPTISERVE_CACHE") or Path.home() / ".cache" / "optiserve")


def train(recipe: Recipe = Recipe(), *, progress: bool = True) -> torch.nn.Module:
    """Train a fresh model with ``recipe`` (no cache): the same recipe and data give identical weights."""
    from optiserve.optimizers._torch_train import deterministic, fine_tune, steps_for
    from optiserve.progress import Steps

    x, y = training_set(recipe.samples)
    with deterministic(recipe.seed):
        module = architecture(recipe.width, recipe.hidden)
    total = steps_for(len(x), recipe.epochs, recipe.batch_size)
    label = f"Training fashion-cnn on {len(x)} {_raw()[2]} images ({recipe.epochs} epochs, once per machine)"
    with Steps(enabled=progress).task(label, total=total) as advance:
        fine_tune(
            module,
            x,
            y,
            recipe.epochs,
            recipe.lr,
            recipe.batch_size,
            recipe.seed,
            weight_decay=recipe.weight_decay,
            on_step=advance,
        )
    return module.eval()


def trained(recipe: Recipe = Recipe(), *, progress: bool = True) -> torch.nn.Module:
    """The model trained with ``recipe``: from the cache when present, else trained and cached."""
    import torch

    module: torch.nn.Module = architecture(recipe.width, recipe.hidden)
    path = cache_dir() / f"fashion-cnn-{recipe.key(_raw()[1])}.pt"
    if path.is_file():
        try:
            module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
            return module.eval()
        except Exception:  # unreadable, truncated or stale (torch raises many kinds): train again,
            pass  # the new file replaces it
    module = train(recipe, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(module.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return module


class FashionCnn(BuiltinModel):
    name: ClassVar[str] = "fashion-cnn"
    description: ClassVar[str] = (
        "small CNN trained here on Fashion-MNIST (28×28 grey, 10 classes; digits when absent), 0.42M params"
    )
    requires: ClassVar[tuple[str, ...]] = ("torch", "sklearn")
    data_description: ClassVar[str] = "28×28 test images (Fashion-MNIST, or digits when absent)"
    serving_requires: ClassVar[tuple[str, ...]] = ("PIL",)
    raw_input: ClassVar[Literal["image", "text"] | None] = "image"
    # distill and qat-int8 train for minutes on 2 cores: ask for them with -o.
    default_optimizers: ClassVar[tuple[str | tuple[str, dict[str, Any]], ...]] = (
        "prune-channels",
        "onnx-export",
        "ort-int8-static",
        "tensorrt-fp16",
        "tensorrt-int8",
    )

    @classmethod
    def spec(cls) -> ModelSpec:
        return ModelSpec(
            name=cls.name,
            source="builtin",
            ref=cls.name,
            task="image-classification",
            inputs=(TensorSpec(name="input", dtype="float32", shape=(None, 1, SIDE, SIDE)),),
            outputs=(TensorSpec(name="logits", dtype="float32", shape=(None, N_CLASSES)),),
        )

    @classmethod
    def build(cls) -> torch.nn.Module:
        return trained()

    @classmethod
    def dataset(cls, split: Split, n: int) -> np.ndarray:
        x, _ = _raw()[0]["test"]
        return _normalize(x[_split_indices(split, n)])

    @classmethod
    def targets(cls, split: Split, n: int) -> np.ndarray:
        _, y = _raw()[0]["test"]
        labels: np.ndarray = y[_split_indices(split, n)]
        return labels

    @classmethod
    def training_data(cls) -> tuple[np.ndarray, np.ndarray]:
        return training_set()

    @classmethod
    def from_raw(cls, items: list[bytes]) -> np.ndarray:
        """Images of any size → greyscale 28×28 (Fashion-MNIST is white-on-black, as sent), normalised."""
        import numpy as np
        from PIL import Image

        from optiserve.models.decode import decode_image

        grey = [
            np.asarray(decode_image(item, i).convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR))
            for i, item in enumerate(items)
        ]
        return _normalize(np.stack(grey))

    @classmethod
    def labels(cls) -> list[str]:
        return FASHION_LABELS if has_fashion_mnist() else [str(i) for i in range(N_CLASSES)]
