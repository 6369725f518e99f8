"""Where EfficientNet-Lite0's INT8 error comes from, and what keeping layers in float buys, in one run.

The INT8 goal (≥ 99% top-1 agreement with FP32 at ≥ 1.4x batch-1 speed) is not met by any recipe tried
(benchmarks/int8_efficientnet.py). This benchmark shows why, on the same eval crops:

1. Error budget. The best recipe's QDQ graph, rebuilt in torch (``QdqModule``), run with only the
   weights rounded to int8 (activations keep their clipping ranges but are not rounded), with only the
   activations rounded to uint8 (FP32 weights and biases), with both, and with neither (clipping only).
   Both sources cost agreement on their own, so neither better weights (AdaRound-style refits,
   ``ort-int8-qat``) nor better activation ranges alone can reach the goal.
2. Float fallback. ``ort-int8-static`` with the first K compute nodes kept in float (real ONNX Runtime
   kernels; the calibration is done once and reused), agreement and speed-up over ONNX Runtime FP32
   timed in alternating rounds: how much of the network must stay float for how much agreement.

    python benchmarks/int8_error_budget.py                  # ~12 min on 2 cores
    python benchmarks/int8_error_budget.py --keep-first 3 20 40 --eval-samples 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from int8_efficientnet import RECIPE, batch1_ms, build_fp32, predict, session

from optiserve.evaluate import agreement_by_margin
from optiserve.manifest import variant_dir
from optiserve.models.resolve import dataset
from optiserve.optimizers.ort_int8_static import OrtInt8Static
from optiserve.types import Variant

FALLBACK = {key: value for key, value in RECIPE.items() if key != "empirical_bias_correction"}
"""The fallback rows' recipe: the best one without the empirical bias correction (minutes per build)."""


def agreement(ref: np.ndarray, out: np.ndarray) -> str:
    agree = ref.argmax(1) == out.argmax(1)
    return f"{agree.mean():6.1%} ({int(agree.sum())}/{len(agree)})"


def simulated(
    int8: Variant, fp32: Variant, workdir: Path, x: np.ndarray, threads: int
) -> dict[str, np.ndarray]:
    """Logits of the INT8 graph rebuilt in torch, with each error source on or off."""
    import onnx
    import torch

    from optiserve.optimizers.ort_int8_qat import QdqModule

    torch.set_num_threads(threads)
    quantized = onnx.load(str(variant_dir(workdir, int8.id) / int8.artifacts["model"].path))
    float_model = onnx.load(str(variant_dir(workdir, fp32.id) / fp32.artifacts["model"].path))
    modes = {
        "weights and activations rounded": (True, True),
        "weights rounded only": (True, False),
        "activations rounded only": (False, True),
        "neither (ranges clip only)": (False, False),
    }
    out = {}
    for label, (weights, activations) in modes.items():
        module = QdqModule(quantized, float_model, quantize_weights=weights, quantize_activations=activations)
        with torch.no_grad():
            out[label] = np.concatenate(
                [module(torch.from_numpy(x[i : i + 20])).numpy() for i in range(0, len(x), 20)]
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--keep-first", type=int, nargs="+", default=[3, 10, 20, 30, 40])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the variants here (default: temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="int8-budget.") as tmp:
        workdir = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        spec, ctx, fp32 = build_fp32(workdir)
        best = OrtInt8Static(RECIPE).apply(fp32, workdir, ctx)
        print(f"built the best recipe's variant {best.id} in {time.perf_counter() - t0:.0f} s", flush=True)
        x, what = dataset(spec, "eval", args.eval_samples)
        ref_sess = session(fp32, workdir, args.threads)
        ref = predict(ref_sess, x)

        print(
            f"\n1. Error budget of the best recipe (INT8 graph rebuilt in torch), top-1 agreement on {what}:"
        )
        for label, out in simulated(best, fp32, workdir, x, args.threads).items():
            print(f"   {label:34s} {agreement(ref, out)}")

        print(f"\n2. Float fallback (real ONNX Runtime kernels; recipe {FALLBACK} with keep_first K):")
        rows = []
        for k in args.keep_first:
            t = time.perf_counter()
            variant = OrtInt8Static({**FALLBACK, "keep_first": k}).apply(fp32, workdir, ctx)
            sess = session(variant, workdir, args.threads)
            out = predict(sess, x)
            rows.append((k, variant, sess, out))
            print(f"   built keep_first={k} in {time.perf_counter() - t:.0f} s", flush=True)
        medians = batch1_ms([ref_sess] + [sess for _, _, sess, _ in rows], x, args.rounds, args.reps)
        fp32_rounds = np.array(medians[0])
        print(f"   {'float nodes':>11s}  {'agreement':18s} {'speed-up':>8s}  near-tie split")
        for (k, _, _, out), rounds in zip(rows, medians[1:], strict=True):
            speedup = float(np.median(fp32_rounds / np.array(rounds)))
            split = agreement_by_margin(ref, out)
            print(f"   first {k:>5d}  {agreement(ref, out):18s} {speedup:7.2f}x  {split}")
        print(
            f"   ONNX Runtime FP32 batch-1 median: {np.median(fp32_rounds):.2f} ms ({args.threads} threads)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
