"""How good each variant is, in process, on held-out inputs, and whether it passes the accuracy gate.

The gated metric is the task metric where labels exist (top-1 accuracy), otherwise agreement with
the FP32 reference: top-1 agreement for classifiers, cosine similarity for embeddings. A variant
passes when ``value >= gate × reference_value`` (default gate 0.99, as MLPerf requires). Inference runs
through the same Runtime classes the service uses, so what is evaluated is what is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optiserve.manifest import variant_dir
from optiserve.services.runtimes.base import Runtime
from optiserve.types import Evaluation, Metric, MicroBench, ModelSpec, ThreadSpec, Variant


@dataclass(frozen=True)
class EvalSet:
    inputs: np.ndarray
    targets: np.ndarray | None
    description: str


def load_runtime(variant: Variant, runtime_name: str, workdir: Path, threads: ThreadSpec) -> Runtime:
    runtime = Runtime.get(runtime_name)(variant, variant_dir(workdir, variant.id), threads)
    runtime.load()
    return runtime


def metric_for(spec: ModelSpec, reference_outputs: np.ndarray, targets: np.ndarray | None) -> Metric:
    if targets is not None:
        return "top1_accuracy"
    if spec.task == "text-embedding":
        return "cosine_similarity"
    if reference_outputs.ndim == 2 and reference_outputs.shape[1] > 1:
        return "top1_agreement"
    return "max_abs_diff"


def score(metric: Metric, out: np.ndarray, ref: np.ndarray, targets: np.ndarray | None) -> float:
    if metric == "top1_accuracy":
        assert targets is not None
        return float((out.argmax(axis=1) == targets).mean())
    if metric == "top1_agreement":
        return float((out.argmax(axis=1) == ref.argmax(axis=1)).mean())
    if metric == "cosine_similarity":
        a = out.reshape(len(out), -1).astype(np.float64)
        b = ref.reshape(len(ref), -1).astype(np.float64)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        return float(np.mean((a * b).sum(axis=1) / np.maximum(denom, 1e-12)))
    return float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())


def evaluate_outputs(
    variant: Variant,
    runtime: str,
    reference: Variant,
    ref_out: np.ndarray,
    out: np.ndarray,
    targets: np.ndarray | None,
    *,
    gate: float | None = 0.99,
    latency: MicroBench | None = None,
) -> Evaluation:
    metric = metric_for(variant.model, ref_out, targets)
    value = score(metric, out, ref_out, targets)
    reference_value = score(metric, ref_out, ref_out, targets)
    gated = gate if metric != "max_abs_diff" else None
    agreement = (
        score("top1_agreement", out, ref_out, None) if ref_out.ndim == 2 and ref_out.shape[1] > 1 else None
    )
    return Evaluation(
        variant_id=variant.id,
        runtime=runtime,
        reference_variant_id=reference.id,
        metric=metric,
        value=value,
        reference_value=reference_value,
        n_samples=len(out),
        max_abs_diff=score("max_abs_diff", out, ref_out, None),
        agreement=agreement,
        gate=gated,
        passed=gated is None or value >= gated * reference_value - 1e-12,
        latency=latency,
    )


def agreement_by_margin(ref_logits: np.ndarray, out_logits: np.ndarray, margin: float = 0.05) -> str:
    """Top-1 agreement split by how decided the reference was: one line for benchmark output.

    A sample whose reference top-1 and top-2 softmax probabilities lie within ``margin`` is a near
    tie: any numeric change may flip it, so agreement there measures noise as much as quality.
    """
    probs = np.exp(ref_logits - ref_logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top2 = np.sort(probs, 1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < margin
    agree = ref_logits.argmax(1) == out_logits.argmax(1)

    def part(mask: np.ndarray) -> str:
        return f"{agree[mask].mean():.1%} of {int(mask.sum())}" if mask.any() else "none"

    return (
        f"agreement where FP32's top-2 probabilities differ by ≥ {margin:.2f}: {part(~tie)}; "
        f"on near ties: {part(tie)}"
    )
