"""Bring your own data: a user's ONNX image classifier evaluated and calibrated on the user's labelled
images and .npz files, with the gate on accuracy; bad data is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tests.conftest import error_lines, run_cli

SIDE = 8
COLOURS = {"blue": 2, "green": 1, "red": 0}  # folder → RGB channel; sorted folder order: blue, green, red
PREPROCESS = {
    "resize": SIDE,
    "crop": SIDE,
    "mean": [0, 0, 0],
    "std": [255, 255, 255],
    "layout": "NCHW",
    "color": "RGB",
}


def write_colour_classifier(path: Path) -> Path:
    """(n, 3, 8, 8) → 3 logits: the mean of the blue, green and red channels (classes 0, 1, 2)."""
    w = np.zeros((3, 3 * SIDE * SIDE), dtype=np.float32)
    for cls, channel in enumerate((2, 1, 0)):
        w[cls, channel * SIDE * SIDE : (channel + 1) * SIDE * SIDE] = 1.0 / (SIDE * SIDE)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
        ],
        "colours",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_images(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, channel in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, size=(12, 12, 3))
            pixels[..., channel] += 120 if i % 10 else 40  # one in ten is a hard case
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{seed}-{i}.png")
    return root


@pytest.fixture
def user_model(tmp_path: Path) -> Path:
    return write_colour_classifier(tmp_path / "colours.onnx")


def experiment(tmp_path: Path, model: Path, **sections: object) -> Path:
    config = {
        "model": {"ref": str(model), "preprocess": PREPROCESS},
        "workdir": str(tmp_path / "work"),
        "optimizers": [{"name": "ort-int8-static"}],
        "serving": {"runtimes": ["onnxruntime"]},
        "load": {"concurrency": [1], "duration_s": 1.0, "warmup_s": 0.5},
        **sections,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evaluations(work: Path) -> list[dict[str, object]]:
    (run,) = (work / "results").iterdir()
    return [json.loads(p.read_text()) for p in sorted((run / "eval").glob("*.json"))]


@pytest.mark.slow
def test_run_on_a_labelled_image_folder_gates_on_accuracy(user_model: Path, tmp_path: Path) -> None:
    evaluation = write_images(tmp_path / "eval", 20, seed=1)
    calibration = write_images(tmp_path / "calib", 10, seed=2)
    config = experiment(
        tmp_path, user_model, eval={"data": str(evaluation)}, calibration={"data": str(calibration)}
    )
    done = run_cli("run", config, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    found = evaluations(tmp_path / "work")
    assert {e["metric"] for e in found} == {"top1_accuracy"}
    assert all(
        e["n_samples"] == 60 and f"60 labelled images of 3 classes from {evaluation}" == e["data"]
        for e in found
    )
    fp32 = next(e for e in found if e["variant_id"] == e["reference_variant_id"])
    assert fp32["reference_value"] > 0.85  # the colour classifier is right on most images
    assert all(e["ratio_ci"] is not None for e in found)
    assert "top-1 acc" in done.stdout


@pytest.mark.slow
def test_run_on_a_labelled_npz_gates_on_accuracy(user_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=48)
    x = rng.uniform(0, 0.3, size=(48, 3, SIDE, SIDE)).astype(np.float32)
    for i, cls in enumerate(y):
        x[i, (2, 1, 0)[cls]] += 0.5
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    np.savez(tmp_path / "calib.npz", x=rng.uniform(0, 0.8, size=(16, 3, SIDE, SIDE)).astype(np.float32))
    config = experiment(
        tmp_path,
        user_model,
        eval={"data": str(tmp_path / "eval.npz")},
        calibration={"data": str(tmp_path / "calib.npz")},
    )
    done = run_cli("run", config, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    found = evaluations(tmp_path / "work")
    assert {e["metric"] for e in found} == {"top1_accuracy"}
    assert all(e["n_samples"] == 48 for e in found)
    assert next(e for e in found if e["variant_id"] == e["reference_variant_id"])["value"] == 1.0


def bad_folder_no_images(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "empty" / "red").mkdir(parents=True)
    (tmp_path / "empty" / "red" / "notes.txt").write_text("no images here")
    return {"eval": {"data": str(tmp_path / "empty")}}


def bad_unreadable_file(tmp_path: Path) -> dict[str, object]:
    root = write_images(tmp_path / "eval", 2, seed=1)
    (root / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    return {"eval": {"data": str(root)}}


def bad_label_outside_classes(tmp_path: Path) -> dict[str, object]:
    np.savez(tmp_path / "e.npz", x=np.zeros((4, 3, SIDE, SIDE), np.float32), y=np.array([0, 1, 2, 7]))
    return {"eval": {"data": str(tmp_path / "e.npz")}}


def bad_csv_columns(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "e.csv").write_text("file,class\na.png,1\n")
    return {"eval": {"data": str(tmp_path / "e.csv")}}


def bad_overlap(tmp_path: Path) -> dict[str, object]:
    root = write_images(tmp_path / "eval", 3, seed=1)
    return {"eval": {"data": str(root)}, "calibration": {"data": str(root)}}


def bad_shape(tmp_path: Path) -> dict[str, object]:
    np.savez(tmp_path / "e.npz", x=np.zeros((4, 3, 5, 5), np.float32), y=np.zeros(4, np.int64))
    return {"eval": {"data": str(tmp_path / "e.npz")}}


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (bad_folder_no_images, "no images"),
        (bad_unreadable_file, "broken.png: not a readable image"),
        (bad_label_outside_classes, "label 7 is outside the model's classes (0-2)"),
        (
            bad_csv_columns,
            "expected columns path,label or text,label (or text1,text2,score) (found: class, file)",
        ),
        (bad_overlap, "share 9 samples"),
        (bad_shape, "x has samples of shape (3, 5, 5), the model takes (n, 3, 8, 8)"),
    ],
)
def test_bad_user_data_is_one_line_and_nothing_is_written(
    user_model: Path, tmp_path: Path, make: object, words: str
) -> None:
    config = experiment(tmp_path, user_model, **make(tmp_path))  # type: ignore[operator]
    done = run_cli("run", config, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr)
    assert words in line, line
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir()), "something was written"


def test_images_without_a_declared_preprocessing_are_refused(user_model: Path, tmp_path: Path) -> None:
    root = write_images(tmp_path / "eval", 2, seed=1)
    config = {
        "model": {"ref": str(user_model)},
        "workdir": str(tmp_path / "work"),
        "eval": {"data": str(root)},
    }
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(config))
    done = run_cli("optimize", tmp_path / "x.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr)
    assert "images need model.preprocess" in line


@pytest.mark.slow
def test_an_embedding_model_is_gated_on_scored_text_pairs(tmp_path: Path) -> None:
    """STS: the embeddings' cosine similarity ranked against gold scores (Spearman), for every variant."""
    pairs = [
        ("A man is playing a guitar.", "A person plays the guitar.", 4.6),
        ("A man is playing a guitar.", "A woman is slicing an onion.", 0.2),
        ("The cat sits on the mat.", "A cat is sitting on a rug.", 4.0),
        ("The cat sits on the mat.", "Stock markets fell sharply today.", 0.0),
        ("Children are playing in the park.", "Kids play outside in a park.", 4.4),
        ("Children are playing in the park.", "A plane is taking off.", 0.3),
        ("The weather is sunny and warm.", "It is a hot, bright day.", 3.8),
        ("The weather is sunny and warm.", "He repaired the old bicycle.", 0.1),
        ("She is reading a book.", "A woman reads a novel.", 4.2),
        ("She is reading a book.", "The orchestra played a symphony.", 0.4),
    ]
    lines = ["text1,text2,score", *(f'"{a}","{b}",{s}' for a, b, s in pairs)]
    (tmp_path / "sts.csv").write_text("\n".join(lines) + "\n")
    config = {
        "model": {"ref": "minilm-l6"},
        "workdir": str(tmp_path / "work"),
        "optimizers": [{"name": "onnx-export"}],
        "serving": {"runtimes": ["onnxruntime"]},
        "eval": {"data": str(tmp_path / "sts.csv"), "microbench": False},
    }
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(config))
    done = run_cli("optimize", tmp_path / "x.yaml", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    found = [json.loads(p.read_text()) for p in (tmp_path / "work" / "variants").glob("*/evaluation.*.json")]
    assert found and {e["metric"] for e in found} == {"sts_spearman"}
    for ev in found:
        assert ev["n_samples"] == 10 and ev["reference_value"] > 0.8  # MiniLM ranks these pairs right
        assert ev["ratio_ci"] is not None and ev["passed"]
