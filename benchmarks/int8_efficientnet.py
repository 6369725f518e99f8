"""EfficientNet-Lite0 INT8 with ONNX Runtime: top-1 accuracy against FP32's and batch-1 speed-up, one run.

Builds the variants through the real optimizer classes (source → onnx-export → ort-int8-static, with
``Optimizer.apply`` in a temporary workdir), then measures both variants in this process with the
same session settings: top-1 accuracy on the labelled photo set (optiserve/data/labelled_photos.yaml,
disjoint from the calibration photos), as MLPerf judges INT8 (>= 99% of FP32's accuracy), with the
paired-bootstrap 95% interval of the ratio; top-1 agreement with FP32 as a secondary figure (on the
labelled set and on the unlabelled stress crops); and the ratio of median batch-1 latencies, FP32 over
INT8, timed in alternating rounds so that load from other processes hits both alike.

    python benchmarks/int8_efficientnet.py                      # the best recipe found (RECIPE)
    python benchmarks/int8_efficientnet.py --config '{"calibrate_method": "minmax"}'
    python benchmarks/int8_efficientnet.py --eval-samples 1000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from optiserve.evaluate import agreement_by_margin, hits, paired_intervals
from optiserve.hardware import int8_cpu_features, int8_dot_product_saturates
from optiserve.manifest import variant_dir
from optiserve.models.resolve import dataset, resolve_model, stress_dataset, targets
from optiserve.optimizers.base import OptimizeContext
from optiserve.optimizers.onnx_export import OnnxExport
from optiserve.optimizers.ort_int8_static import OrtInt8Static
from optiserve.optimizers.source import materialize_source
from optiserve.types import ModelSpec, Variant

GOAL_ACCURACY_RATIO, GOAL_SPEEDUP = 0.99, 1.4
RECIPE = {
    "keep_first": 3,
    "keep_last": 1,
    "percentile": 99.99,
    "empirical_bias_correction": True,
    "bias_correction_samples": 128,
}
"""The best recipe found (chosen on held-out calibration crops): the optimizer's defaults (percentile
calibration, per-channel weights, weight bias correction) with percentile 99.99, the stem, the first
block and the classifier kept in float (the classifier costs no measurable time), and the measured
layer-by-layer bias correction on 128 calibration crops."""


def build_fp32(workdir: Path) -> tuple[ModelSpec, OptimizeContext, Variant]:
    """EfficientNet-Lite0's FP32 ONNX variant in ``workdir`` (reused when built before), its spec, and
    the optimize context the INT8 variants are built with."""
    spec = resolve_model("efficientnet-lite0")
    ctx = OptimizeContext(workdir)
    return spec, ctx, OnnxExport().apply(materialize_source(spec, workdir), workdir, ctx)


def session(variant: Variant, workdir: Path, threads: int):  # type: ignore[no-untyped-def]
    """The onnxruntime runtime's settings (all graph optimizations, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = variant_dir(workdir, variant.id) / variant.artifacts["model"].path
    # ORT's WeightBiasQuantization pass would re-quantize (per tensor) the float nodes the recipe keeps.
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["WeightBiasQuantization"]
    )


def predict(sess, x: np.ndarray, batch: int = 50) -> np.ndarray:  # type: ignore[no-untyped-def]
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def batch1_ms(sessions: list, x: np.ndarray, rounds: int, reps: int) -> list[list[float]]:  # type: ignore[type-arg]
    """Median batch-1 latency (ms) of each session in each of ``rounds`` alternating rounds."""
    one = np.ascontiguousarray(x[:1])
    medians: list[list[float]] = [[] for _ in sessions]
    for s in sessions:
        for _ in range(10):
            s.run(None, {s.get_inputs()[0].name: one})
    for _ in range(rounds):
        for k, s in enumerate(sessions):
            name = s.get_inputs()[0].name
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                s.run(None, {name: one})
                times.append(time.perf_counter() - t)
            medians[k].append(float(np.median(times)) * 1e3)
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=json.dumps(RECIPE), help=f"ort-int8-static config as JSON (default: {RECIPE})"
    )
    parser.add_argument("--eval-samples", type=int, default=1000, help="labelled crops (at most; 924)")
    parser.add_argument("--stress-samples", type=int, default=500, help="unlabelled crops, agreement only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the variants here (default: a temp dir)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="int8-bench.") as tmp:
        workdir = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        spec, ctx, fp32 = build_fp32(workdir)
        quantizer = OrtInt8Static(json.loads(args.config))
        int8 = quantizer.apply(fp32, workdir, ctx)
        print(
            f"built {int8.id} in {time.perf_counter() - t0:.0f} s with {quantizer.config.model_dump_json()}"
        )

        x, what = dataset(spec, "eval", args.eval_samples)
        y = targets(spec, "eval", args.eval_samples)
        if y is None:
            raise SystemExit("no labelled photos are installed (make system-deps installs them)")
        stress = stress_dataset(spec, args.stress_samples)
        ref_sess, int8_sess = session(fp32, workdir, args.threads), session(int8, workdir, args.threads)
        ref, out = predict(ref_sess, x), predict(int8_sess, x)
        ref_hits, int8_hits = hits(ref, y).astype(float), hits(out, y).astype(float)
        _, ratio_ci = paired_intervals(int8_hits, ref_hits)
        ratio = int8_hits.mean() / ref_hits.mean()
        agreement = float((out.argmax(1) == ref.argmax(1)).mean())
        assert stress is not None
        stress_agreement = float(
            (predict(int8_sess, stress).argmax(1) == predict(ref_sess, stress).argmax(1)).mean()
        )
        fp32_rounds, int8_rounds = batch1_ms([ref_sess, int8_sess], x, args.rounds, args.reps)
        ratios = np.array(fp32_rounds) / np.array(int8_rounds)
        speedup = float(np.median(ratios))
        fp32_ms, int8_ms = float(np.median(fp32_rounds)), float(np.median(int8_rounds))

    print(f"eval: {what}; {args.threads} threads, batch 1, {args.rounds}×{args.reps} runs per variant")
    assert ratio_ci is not None
    print(
        f"top-1 accuracy: FP32 {ref_hits.mean():.1%}, INT8 {int8_hits.mean():.1%} (n={len(x)}) → "
        f"INT8/FP32 {ratio:.1%} [95% CI {ratio_ci.low:.1%}, {ratio_ci.high:.1%}]; "
        f"top-5: FP32 {hits(ref, y, 5).mean():.1%}, INT8 {hits(out, y, 5).mean():.1%}"
    )
    print(
        f"top-1 agreement with FP32 (secondary): {agreement:.1%} on the labelled crops; "
        f"{stress_agreement:.1%} on {len(stress)} unlabelled stress crops"
    )
    print(agreement_by_margin(ref, out))
    print(
        f"CPU: {'no VNNI (u8×s8 dot products saturate)' if int8_dot_product_saturates() else 'VNNI'} "
        f"({', '.join(int8_cpu_features()) or 'not x86'}); reduce_range={quantizer.config.reduce_range}"
    )
    print(
        f"batch-1 latency: FP32 {fp32_ms:.2f} ms, INT8 {int8_ms:.2f} ms → speed-up {speedup:.2f}x "
        f"(median of {len(ratios)} rounds; range {ratios.min():.2f}-{ratios.max():.2f}x)"
    )
    met = ratio >= GOAL_ACCURACY_RATIO and speedup >= GOAL_SPEEDUP
    print(
        f"goal (INT8 top-1 accuracy ≥ {GOAL_ACCURACY_RATIO:.0%} of FP32's and ≥ {GOAL_SPEEDUP}x at batch 1): "
        f"{'met' if met else 'not met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
