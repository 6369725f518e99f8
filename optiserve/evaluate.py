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
from optiserve.types import Evaluation, Interval, Metric, MicroBench, ModelSpec, ThreadSpec, Variant


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
    if targets is not None and np.issubdtype(targets.dtype, np.floating):
        return "sts_spearman"  # gold scores of text pairs
    if targets is not None:
        return "top1_accuracy"
    if spec.task == "text-embedding":
        return "cosine_similarity"
    if reference_outputs.ndim == 2 and reference_outputs.shape[1] > 1:
        return "top1_agreement"
    return "max_abs_diff"


TIE_MARGIN = 0.05
"""FP32 top-2 probabilities closer than this make a near tie (any numeric change may flip it)."""
BOOTSTRAP = 2000


def hits(out: np.ndarray, targets: np.ndarray, k: int = 1) -> np.ndarray:
    """Per sample, whether one of the top-``k`` classes is acceptable. ``targets``: one class per
    sample, or a (n, m) matrix of acceptable classes padded with -1."""
    acceptable = targets.reshape(len(targets), -1)
    top = np.argsort(-out, axis=1)[:, :k]
    found: np.ndarray = (top[:, :, None] == acceptable[:, None, :]).any(axis=(1, 2))
    return found


def pair_similarity(out: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair's embeddings: the first half of ``out`` against the second."""
    n = len(out) // 2
    a = out[:n].reshape(n, -1).astype(np.float64)
    b = out[n : 2 * n].reshape(n, -1).astype(np.float64)
    sims: np.ndarray = (a * b).sum(axis=1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
    )
    return sims


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation along the last axis (ties get the mean rank), vectorised."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    rho: np.ndarray = (rx * ry).sum(axis=-1) / np.maximum(
        np.sqrt((rx**2).sum(axis=-1) * (ry**2).sum(axis=-1)), 1e-12
    )
    return rho


def sts_intervals(
    mine: np.ndarray, reference: np.ndarray, gold: np.ndarray, seed: int = 0
) -> tuple[Interval, Interval | None]:
    """Paired bootstrap over pairs of Spearman's rho (mine) and of rho(mine) / rho(reference)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gold), size=(BOOTSTRAP, len(gold)))
    a, b = spearman(mine[idx], gold[idx]), spearman(reference[idx], gold[idx])
    value = Interval(low=float(np.percentile(a, 2.5)), high=float(np.percentile(a, 97.5)))
    # a resample of few pairs can rank nothing (the reference's rho <= 0): a ratio needs most to rank
    valid = b > 0
    if valid.mean() < 0.95:
        return value, None
    r = a[valid] / b[valid]
    return value, Interval(low=float(np.percentile(r, 2.5)), high=float(np.percentile(r, 97.5)))


def score(metric: Metric, out: np.ndarray, ref: np.ndarray, targets: np.ndarray | None) -> float:
    if metric == "sts_spearman":
        assert targets is not None
        return float(spearman(pair_similarity(out), targets))
    if metric == "top1_accuracy":
        assert targets is not None
        return float(hits(out, targets).mean())
    if metric == "top1_agreement":
        return float((out.argmax(axis=1) == ref.argmax(axis=1)).mean())
    if metric == "cosine_similarity":
        a = out.reshape(len(out), -1).astype(np.float64)
        b = ref.reshape(len(ref), -1).astype(np.float64)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        return float(np.mean((a * b).sum(axis=1) / np.maximum(denom, 1e-12)))
    return float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())


def per_sample(metric: Metric, out: np.ndarray, ref: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    """The metric's per-sample values, whose mean is :func:`score` (for the bootstrap)."""
    values: np.ndarray
    if metric == "top1_accuracy":
        assert targets is not None
        values = hits(out, targets).astype(np.float64)
    elif metric == "top1_agreement":
        values = (out.argmax(axis=1) == ref.argmax(axis=1)).astype(np.float64)
    else:
        a = out.reshape(len(out), -1).astype(np.float64)
        b = ref.reshape(len(ref), -1).astype(np.float64)
        values = (a * b).sum(axis=1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
        )
    return values


def paired_intervals(
    mine: np.ndarray, reference: np.ndarray, seed: int = 0
) -> tuple[Interval, Interval | None]:
    """95% percentile-bootstrap intervals of mean(mine) and of mean(mine) / mean(reference), resampling
    the same samples for both (the pairing is what makes the ratio's interval narrow)."""
    rng = np.random.default_rng(seed)
    n = len(mine)
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    a, b = mine[idx].mean(axis=1), reference[idx].mean(axis=1)
    value = Interval(low=float(np.percentile(a, 2.5)), high=float(np.percentile(a, 97.5)))
    if not (b > 0).all():
        return value, None
    r = a / b
    return value, Interval(low=float(np.percentile(r, 2.5)), high=float(np.percentile(r, 97.5)))


def agreement_split(
    ref: np.ndarray, out: np.ndarray, margin: float = TIE_MARGIN
) -> tuple[float | None, int, float | None, int]:
    """(agreement on decided samples, their count, agreement on near ties, their count)."""
    probs = np.exp(ref - ref.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top2 = np.sort(probs, 1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < margin
    agree = ref.argmax(1) == out.argmax(1)
    decided = float(agree[~tie].mean()) if (~tie).any() else None
    ties = float(agree[tie].mean()) if tie.any() else None
    return decided, int((~tie).sum()), ties, int(tie.sum())


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
    data: str | None = None,
    stress: tuple[np.ndarray, np.ndarray] | None = None,
) -> Evaluation:
    """``stress``: (reference outputs, these outputs) on the model's unlabelled stress set."""
    metric = metric_for(variant.model, ref_out, targets)
    value = score(metric, out, ref_out, targets)
    reference_value = score(metric, ref_out, ref_out, targets)
    gated = gate if metric != "max_abs_diff" else None
    classifier = ref_out.ndim == 2 and ref_out.shape[1] > 1 and variant.model.task != "text-embedding"
    agreement = score("top1_agreement", out, ref_out, None) if classifier else None
    value_ci = ratio_ci = None
    if metric == "sts_spearman":
        assert targets is not None
        value_ci, ratio_ci = sts_intervals(pair_similarity(out), pair_similarity(ref_out), targets)
    elif metric != "max_abs_diff":
        value_ci, ratio_ci = paired_intervals(
            per_sample(metric, out, ref_out, targets), per_sample(metric, ref_out, ref_out, targets)
        )
    split = agreement_split(ref_out, out) if classifier else (None, None, None, None)
    top5 = ref_top5 = None
    if targets is not None and classifier and ref_out.shape[1] >= 5:
        top5, ref_top5 = float(hits(out, targets, 5).mean()), float(hits(ref_out, targets, 5).mean())
    stress_agreement = stress_n = None
    if stress is not None and classifier:
        stress_agreement = score("top1_agreement", stress[1], stress[0], None)
        stress_n = len(stress[0])
    return Evaluation(
        variant_id=variant.id,
        runtime=runtime,
        reference_variant_id=reference.id,
        metric=metric,
        value=value,
        reference_value=reference_value,
        n_samples=len(targets) if metric == "sts_spearman" and targets is not None else len(out),
        max_abs_diff=score("max_abs_diff", out, ref_out, None),
        agreement=agreement,
        gate=gated,
        passed=gated is None or value >= gated * reference_value - 1e-12,
        latency=latency,
        data=data,
        value_ci=value_ci,
        ratio_ci=ratio_ci,
        top5=top5,
        reference_top5=ref_top5,
        agreement_decided=split[0],
        n_decided=split[1],
        agreement_ties=split[2],
        n_ties=split[3],
        stress_agreement=stress_agreement,
        stress_n=stress_n,
    )


def agreement_by_margin(ref_logits: np.ndarray, out_logits: np.ndarray, margin: float = TIE_MARGIN) -> str:
    """Top-1 agreement split by how decided the reference was: one line for benchmark output.

    A sample whose reference top-1 and top-2 softmax probabilities lie within ``margin`` is a near
    tie: any numeric change may flip it, so agreement there measures noise as much as quality.
    """
    decided, n_decided, ties, n_ties = agreement_split(ref_logits, out_logits, margin)

    def part(value: float | None, n: int) -> str:
        return f"{value:.1%} of {n}" if value is not None else "none"

    return (
        f"agreement where FP32's top-2 probabilities differ by ≥ {margin:.2f}: {part(decided, n_decided)}; "
        f"on near ties: {part(ties, n_ties)}"
    )
