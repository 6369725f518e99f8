"""EfficientNet-Lite0 INT8 by quantization-aware distillation (``ort-int8-qat``): agreement and speed-up.

Builds the variant through the real optimizer classes (source → onnx-export → ort-int8-qat, with
``Optimizer.apply`` in a temporary workdir). The student trains only on calibration-split crops, given
to the optimizer as its calibration set (``OptimizeContext.calibration_path``); the first 300 of them
(the standard calibration crops) also calibrate the post-training starting point. Then, in this
process and with the session settings of benchmarks/int8_efficientnet.py:

* top-1 agreement with FP32 on the standard eval crops;
* leave-photos-out agreement: on the eval crops of photos none of the training crops comes from
  (with ``--train-photos`` the training crops come from a subset of the photos only);
* the batch-1 speed-up, FP32 over INT8 median latency, timed in alternating rounds.

    python benchmarks/int8_qat_efficientnet.py                          # the recipe (RECIPE)
    python benchmarks/int8_qat_efficientnet.py --config '{"steps": 100}' --baseline
    python benchmarks/int8_qat_efficientnet.py --train-photos 1,3,5,7,9  # stricter leave-photos-out
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from optiserve.models.efficientnet_lite0 import preprocess
from optiserve.models.images import crop_photos, crops, photos
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.base import OptimizeContext
from optiserve.optimizers.onnx_export import OnnxExport
from optiserve.optimizers.ort_int8_qat import OrtInt8Qat
from optiserve.optimizers.source import materialize_source
from optiserve.types import Variant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_efficientnet import batch1_ms, predict, session

GOAL_AGREEMENT, GOAL_SPEEDUP = 0.99, 1.4
RECIPE: dict[str, object] = {"steps": 0}
"""The default run: ``ort-int8-static`` with benchmarks/int8_efficientnet.py's recipe (minus its
empirical bias correction), then the layer-wise reconstruction of every quantized Conv's weights and
bias (the optimizer's defaults), no end-to-end distillation. End-to-end distillation is
``{"steps": 300, "lr": 5e-6, "temperature": 1.0}`` (with ``"reconstruct": false`` for it alone)."""


def crop_set(split: str, n: int, only: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """``n`` preprocessed crops of ``split`` (from photos ``only``) and the photo index of each."""
    images = crops(split, n, photos=only)
    return np.stack([preprocess(img) for img in images]), crop_photos(split, n, photos=only)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    same = a.argmax(1) == b.argmax(1)
    return float(same.mean()) if len(same) else float("nan"), int(same.sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=json.dumps(RECIPE), help=f"ort-int8-qat config (default {RECIPE})"
    )
    parser.add_argument("--train-crops", type=int, default=2000, help="calibration-split crops to train on")
    parser.add_argument(
        "--train-photos", default=None, help="comma-separated photo indices the training crops come from"
    )
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--baseline", action="store_true", help="also measure the post-training start")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the variants here (default: temp)")
    args = parser.parse_args()
    only = [int(i) for i in args.train_photos.split(",")] if args.train_photos else None

    with tempfile.TemporaryDirectory(prefix="int8-qat-bench.") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        spec = resolve_model("efficientnet-lite0")
        train, train_photos = crop_set("calibration", args.train_crops, only)
        np.save(workdir / "train_crops.npy", train)
        ctx = OptimizeContext(
            workdir, calibration_samples=len(train), calibration_path=workdir / "train_crops.npy"
        )
        del train
        fp32 = OnnxExport().apply(materialize_source(spec, workdir), workdir, ctx)
        config = json.loads(args.config)
        variants: dict[str, Variant] = {}
        if args.baseline:
            start = {**config, "steps": 0, "reconstruct": False}
            variants["post-training start (no reconstruction, steps=0)"] = OrtInt8Qat(start).apply(
                fp32, workdir, ctx
            )
        t0 = time.perf_counter()
        optimizer = OrtInt8Qat(config)
        int8 = variants["ort-int8-qat variant"] = optimizer.apply(fp32, workdir, ctx)
        build_s = time.perf_counter() - t0
        log = json.loads((workdir / "variants" / int8.id / "qat.json").read_text())

        x, eval_photos = crop_set("eval", args.eval_samples, None)
        unseen = np.array([p not in set(train_photos) for p in eval_photos])
        ref_sess = session(fp32, workdir, args.threads)
        ref = predict(ref_sess, x)
        print(f"built {int8.id} in {build_s:.0f} s with {optimizer.config.model_dump_json()}")
        print(f"optimizer log: {json.dumps(log)}")
        names = [str(i) for i in range(len(photos()))]
        print(
            f"training: {log['training_samples']} calibration crops (+{log['holdout_samples']} held out) "
            f"of photos {sorted(set(train_photos))}; eval: {len(x)} eval crops of photos "
            f"{sorted(set(eval_photos))} (of {len(names)}); {int(unseen.sum())} eval crops from photos "
            "never trained on"
        )
        results = {}
        for label, variant in variants.items():
            out = predict(session(variant, workdir, args.threads), x)
            (agree, hits), (unseen_agree, unseen_hits) = (
                agreement(out, ref),
                agreement(out[unseen], ref[unseen]),
            )
            results[label] = agree
            print(
                f"{label}: top-1 agreement with FP32 {agree:.1%} ({hits}/{len(x)}); "
                f"leave-photos-out {unseen_agree:.1%} ({unseen_hits}/{int(unseen.sum())})"
            )
        fp32_rounds, int8_rounds = batch1_ms(
            [ref_sess, session(int8, workdir, args.threads)], x, args.rounds, args.reps
        )

    ratios = np.array(fp32_rounds) / np.array(int8_rounds)
    speedup = float(np.median(ratios))
    print(
        f"batch-1 latency ({args.threads} threads): FP32 {np.median(fp32_rounds):.2f} ms, INT8 "
        f"{np.median(int8_rounds):.2f} ms → speed-up {speedup:.2f}x (median of {len(ratios)} rounds; "
        f"range {ratios.min():.2f}-{ratios.max():.2f}x)"
    )
    final = results["ort-int8-qat variant"]
    met = final >= GOAL_AGREEMENT and speedup >= GOAL_SPEEDUP
    print(f"goal (≥{GOAL_AGREEMENT:.0%} agreement and ≥{GOAL_SPEEDUP}x): {'met' if met else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
