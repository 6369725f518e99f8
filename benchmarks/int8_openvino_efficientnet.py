"""INT8 OpenVINO variants of EfficientNet-Lite0 vs ONNX Runtime FP32 (issue 3's performance target).

Builds the variants through the real optimizer classes, in a workdir (a temp one unless given):

    source → onnx-export → openvino-fp32 → nncf-int8 / nncf-int8-ac   (and openvino-fp16)

then prints, for each, the top-1 agreement with ONNX Runtime FP32 on the eval crops (disjoint from
the calibration crops every optimizer saw) and the batch-1 speed-up over ONNX Runtime FP32, every
runtime with the same intra-op threads, timed in one process in interleaved rounds (the median of
each runtime's per-call times; ratios are what to compare, absolute times depend on the machine).

    python benchmarks/int8_openvino_efficientnet.py                    # ~5 min on 2 cores
    python benchmarks/int8_openvino_efficientnet.py --ac --max-drop 0.01 0.05   # adds nncf-int8-ac

Measured on 2 shared cores of a Xeon with AVX512-VNNI/BF16 (eval: 500 crops; busy machine):
ORT fp32 1.00x; OV fp32 1.000 / 0.99x; OV fp16-weights 0.990 / 0.98x; nncf-int8 with NNCF's
defaults 0.702 / 2.45x; nncf-int8 with this project's defaults (minmax activation ranges, no
overflow fix) 0.772 / 2.28x. On 2 vCPUs of an AMD EPYC with AVX2 only (no VNNI; 2026-12-02), where
u8×s8 dot products saturate: NNCF defaults 0.540 / 1.46x; overflow fix off 0.488 / 1.46x; overflow fix
on, which ``auto`` (this project's default) chooses there, 0.670 / 1.47x. On 2 vCPUs of an EPYC with
AVX512-VNNI (2026-12-02): NNCF defaults 0.702 / 2.07x; symmetric activations with fast bias correction
(this project's former defaults) 0.772 / 2.12x; asymmetric activations with full bias correction (its
defaults now) 0.872 / 1.79x; plus keep_first 3 and keep_last 1 0.912 / 1.63x. The >= 0.99 agreement
target is not met by any INT8 recipe tried (benchmarks/int8_error_budget.py shows why).

The accuracy-controlled variant validates on calibration crops only: it is given
``--calibration-samples + --ac-validation-samples`` calibration crops and holds the last
``--ac-validation-samples`` of them out of the statistics (``validation_fraction``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from optiserve.errors import OptimizationError
from optiserve.manifest import variant_dir
from optiserve.models.resolve import dataset, resolve_model
from optiserve.optimizers.base import OptimizeContext, Optimizer
from optiserve.optimizers.source import materialize_source
from optiserve.services.runtimes.base import Runtime
from optiserve.types import ThreadSpec, Variant


def build(args: argparse.Namespace, workdir: Path) -> list[tuple[str, Variant, str]]:
    """(label, variant, runtime name) for every variant to compare, the reference first."""
    spec = resolve_model("efficientnet-lite0")
    ctx = OptimizeContext(workdir, calibration_samples=args.calibration_samples, threads=args.threads)
    source = materialize_source(spec, workdir)
    onnx = Optimizer.get("onnx-export")().apply(source, workdir, ctx)
    ir = Optimizer.get("openvino-fp32")().apply(onnx, workdir, ctx)
    out = [("onnxruntime fp32", onnx, "onnxruntime"), ("openvino fp32", ir, "openvino")]
    fp16 = Optimizer.get("openvino-fp16")().apply(onnx, workdir, ctx)
    out.append(("openvino fp16 (weights)", fp16, "openvino"))
    recipes = [
        ("nncf-int8 (NNCF defaults)", NNCF_DEFAULTS),
        ("nncf-int8 (our defaults)", {}),
        ("nncf-int8 (symmetric, fast BC)", {"preset": "performance", "fast_bias_correction": True}),
        ("nncf-int8 (keep first 3, last 1)", {"keep_first": 3, "keep_last": 1}),
        ("nncf-int8 (overflow fix off)", {"overflow_fix": "disable"}),
        ("nncf-int8 (overflow fix on)", {"overflow_fix": "enable"}),
    ]
    for label, config in recipes:
        t = time.perf_counter()
        out.append((label, Optimizer.get("nncf-int8")(config).apply(ir, workdir, ctx), "openvino"))
        print(f"built {label} in {time.perf_counter() - t:.0f}s", flush=True)
    if args.ac:
        n_val = args.ac_validation_samples
        total = args.calibration_samples + n_val
        ac_ctx = OptimizeContext(workdir, calibration_samples=total, threads=args.threads)
        for drop in args.max_drop:
            config = {"max_drop": drop, "validation_fraction": n_val / total}
            t = time.perf_counter()
            try:
                variant = Optimizer.get("nncf-int8-ac")(config).apply(ir, workdir, ac_ctx)
            except OptimizationError as e:
                print(f"nncf-int8-ac max_drop={drop}: {e.one_line()}", flush=True)
                continue
            print(f"built nncf-int8-ac max_drop={drop} in {time.perf_counter() - t:.0f}s", flush=True)
            out.append((f"nncf-int8-ac (max_drop {drop:g})", variant, "openvino"))
    return out


NNCF_DEFAULTS = {
    "overflow_fix": "first_layer_only",
    "activations_range_estimator": "default",
    "preset": "performance",
    "fast_bias_correction": True,
}
"""nncf.quantize's own defaults, for comparison with the config defaults chosen here."""


def latencies(runtimes: list[Runtime], x: np.ndarray, rounds: int, calls: int) -> list[float]:
    """Median ms per batch-1 call of each runtime, over ``rounds`` interleaved rounds of ``calls``."""
    for rt in runtimes:
        for _ in range(10):
            rt.infer(x)
    times: list[list[float]] = [[] for _ in runtimes]
    for r in range(rounds):
        order = list(enumerate(runtimes))
        if r % 2:
            order.reverse()  # A-B-B-A: drift of a shared machine hits everyone alike
        for i, rt in order:
            for _ in range(calls):
                t = time.perf_counter()
                rt.infer(x)
                times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) * 1000 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="reuse variants across runs (default: a temp dir)")
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--calibration-samples", type=int, default=300)
    parser.add_argument("--ac-validation-samples", type=int, default=500)
    parser.add_argument("--max-drop", type=float, nargs="+", default=[0.01])
    parser.add_argument(
        "--ac", action="store_true", help="also build nncf-int8-ac (slow: well over 30 min on 2 busy cores)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        variants = build(args, workdir)
        spec = variants[0][1].model
        inputs, about = dataset(spec, "eval", args.eval_samples)
        threads = ThreadSpec(intra_op=args.threads)
        runtimes = []
        for _, variant, name in variants:
            rt = Runtime.get(name)(variant, variant_dir(workdir, variant.id), threads)
            rt.load()
            runtimes.append(rt)
        ref = runtimes[0].infer_any(inputs, chunk=50).argmax(1)
        agreement = [float((rt.infer_any(inputs, chunk=50).argmax(1) == ref).mean()) for rt in runtimes]
        ms = latencies(runtimes, inputs[:1], args.rounds, args.calls)

    print(f"\nefficientnet-lite0, {about}, batch 1, {args.threads} threads, {args.rounds}x{args.calls} calls")
    print(f"{'variant':34} {'runtime':12} {'top-1 agreement':>16} {'ms':>7} {'speed-up vs ORT fp32':>21}")
    for (label, variant, name), agree, t in zip(variants, agreement, ms, strict=True):
        print(f"{label:34} {name:12} {agree:16.3f} {t:7.2f} {ms[0] / t:20.2f}x  {variant.id}")


if __name__ == "__main__":
    main()
