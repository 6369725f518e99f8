"""Issue 3's target: the channel-pruned fashion-cnn runs >= 1.5x faster than the unpruned one on ONNX
Runtime, at <= 1 point of top-1 accuracy lost.

Runs the real pipeline pieces in a temporary workdir: source → prune-channels (fine-tuned on the
training split) → onnx-export, and source → onnx-export; then, in this one process:
  * top-1 accuracy of both ONNX models on the eval split (ONNX Runtime),
  * batch-1 and batch-32 latency of both, interleaved (A B A B ...) so machine noise hits both alike;
    the speed-up is the ratio of the medians.

    python benchmarks/pruned_cnn.py [--ratio 0.5] [--epochs 2] [--samples 5000] [--threads 2]

Measured with the defaults (ratio 0.5, 2 epochs on 10,000 training images) on 2 shared AMD EPYC
cores, ONNX Runtime 1.32, 2 threads: 421,738 → 105,914 parameters (1659 → 426 KB), top-1 on the 5000
eval images 89.06% → 88.86% (−0.20 points); speed-up 2.55x at batch 1 and 2.95x at batch 32 (another
run on a busier machine: 2.99x and 3.42x).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=None, help="prune-channels ratio (default: its own)")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: its own)")
    ap.add_argument("--max-samples", type=int, default=None, help="fine-tuning samples (default: its own)")
    ap.add_argument("--samples", type=int, default=5000, help="eval samples (the whole eval split: 5000)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    args = ap.parse_args()

    import onnxruntime as ort

    from optiserve.manifest import variant_dir
    from optiserve.models.fashion_cnn import FashionCnn
    from optiserve.optimizers.base import OptimizeContext
    from optiserve.optimizers.onnx_export import OnnxExport
    from optiserve.optimizers.prune_channels import PruneChannels
    from optiserve.optimizers.source import materialize_source

    config = {
        k: v
        for k, v in {"ratio": args.ratio, "epochs": args.epochs, "max_samples": args.max_samples}.items()
        if v is not None
    }
    spec = FashionCnn.spec()
    with tempfile.TemporaryDirectory(prefix="pruned-cnn.") as tmp:
        work = Path(tmp)
        ctx = OptimizeContext(work)
        source = materialize_source(spec, work)
        started = time.perf_counter()
        pruned = PruneChannels(config).apply(source, work, ctx)
        prune_s = time.perf_counter() - started
        variants = {
            "unpruned": OnnxExport().apply(source, work, ctx),
            "pruned": OnnxExport().apply(pruned, work, ctx),
        }
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(
                str(variant_dir(work, v.id) / v.artifacts["model"].path),
                opts,
                providers=["CPUExecutionProvider"],
            )
            for name, v in variants.items()
        }
        x = FashionCnn.dataset("eval", args.samples)
        y = FashionCnn.targets("eval", args.samples)
        print(f"prune-channels {PruneChannels(config).config.model_dump()} took {prune_s:.0f}s")
        print(f"{'':10} {'params':>8} {'onnx KB':>8} {'top-1':>7}   (n={len(x)} eval images)")
        acc = {}
        for name, sess in sessions.items():
            inp = sess.get_inputs()[0].name
            out = np.concatenate([sess.run(None, {inp: x[i : i + 500]})[0] for i in range(0, len(x), 500)])
            acc[name] = float((out.argmax(1) == y).mean())
            v = variants[name]
            print(f"{name:10} {v.parameters:>8} {v.size_bytes / 1024:>8.0f} {acc[name]:>7.2%}")
        print(f"accuracy change: {100 * (acc['pruned'] - acc['unpruned']):+.2f} points")
        for batch, calls in ((1, 200), (32, 20)):
            med = _interleaved(sessions, x[:batch], calls, args.rounds)
            base, fast = med["unpruned"] * 1e3, med["pruned"] * 1e3
            print(
                f"batch {batch:>2}: unpruned {base:.3f} ms, pruned {fast:.3f} ms → speed-up "
                f"{base / fast:.2f}x  ({args.threads} threads, median of {args.rounds} interleaved rounds)"
            )


def _interleaved(sessions: dict, batch: np.ndarray, calls: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each session, timed in alternating rounds of ``calls`` calls."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    feeds = {name: {s.get_inputs()[0].name: batch} for name, s in sessions.items()}
    for name, s in sessions.items():  # warm-up
        for _ in range(10):
            s.run(None, feeds[name])
    for r in range(rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
        for name in order:
            s, feed = sessions[name], feeds[name]
            started = time.perf_counter()
            for _ in range(calls):
                s.run(None, feed)
            times[name].append((time.perf_counter() - started) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
