"""The accuracy gate's figures: agreement split by margin, set-valued labels, paired intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optiserve.evaluate import agreement_by_margin, evaluate_outputs, hits, paired_intervals
from optiserve.types import Variant


def test_agreement_by_margin_splits_decided_samples_from_near_ties() -> None:
    ref = np.log(
        np.array(
            [
                [0.90, 0.05, 0.05],  # decided, kept
                [0.80, 0.10, 0.10],  # decided, flipped
                [0.41, 0.40, 0.19],  # near tie, flipped
                [0.34, 0.33, 0.33],  # near tie, kept
            ]
        )
    )
    out = ref.copy()
    out[1] = [0.0, 5.0, 0.0]
    out[2] = [0.0, 5.0, 0.0]
    line = agreement_by_margin(ref, out)
    assert line == (
        "agreement where FP32's top-2 probabilities differ by ≥ 0.05: 50.0% of 2; on near ties: 50.0% of 2"
    )
    assert agreement_by_margin(ref[:2], ref[:2]).endswith("on near ties: none")


# --- the gate's metric, with sets of acceptable classes and intervals -------------------------------------


def test_hits_take_sets_of_acceptable_classes_and_top_k() -> None:
    out = np.array([[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.3, 0.1], [0.0, 0.1, 0.2, 0.7]])
    acceptable = np.array([[1, 2], [2, -1], [0, -1]])  # -1 pads the shorter sets
    assert hits(out, acceptable).tolist() == [True, False, False]
    assert hits(out, acceptable, k=2).tolist() == [True, True, False]
    assert hits(out, np.array([1, 0, 3])).tolist() == [True, True, True]  # one class per sample


def test_the_ratio_interval_is_paired_and_narrows_with_samples() -> None:
    rng = np.random.default_rng(1)
    ref = (rng.random(2000) < 0.8).astype(float)
    mine = ref.copy()
    flip = rng.choice(2000, 40, replace=False)  # 2% of samples change
    mine[flip] = 1 - mine[flip]
    _, wide = paired_intervals(mine[:200], ref[:200])
    _, narrow = paired_intervals(mine, ref)
    assert wide is not None and narrow is not None
    ratio = mine.mean() / ref.mean()
    assert narrow.low <= ratio <= narrow.high
    assert narrow.high - narrow.low < wide.high - wide.low
    assert narrow.high - narrow.low < 0.04  # ±2 points on 2000 paired samples with 2% disagreement
    # unpaired, the same two accuracies would give an interval several times wider
    same, exact = paired_intervals(ref, ref)
    assert exact is not None and exact.low == exact.high == 1.0 and same.low < same.high


def test_the_gate_uses_labels_and_reports_the_evidence(onnx_source: Variant, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((500, 10))
    labels = ref.argmax(1).copy()
    labels[:100] = (labels[:100] + 1) % 10  # FP32 is right on 80%
    out = ref.copy()
    out[100:110] = np.roll(out[100:110], 1, axis=1)  # 10 right answers become wrong (2% of samples)
    ev = evaluate_outputs(onnx_source, "onnxruntime", onnx_source, ref, out, labels, gate=0.99)
    assert ev.metric == "top1_accuracy" and ev.n_samples == 500
    assert ev.reference_value == pytest.approx(0.8)
    assert ev.value == pytest.approx(0.78)
    assert not ev.passed  # 0.78 / 0.80 = 0.975 < 0.99
    assert ev.ratio_ci is not None and ev.ratio_ci.low < 0.975 < ev.ratio_ci.high
    assert ev.top5 is not None and ev.agreement == pytest.approx(0.98)
    assert ev.n_decided is not None and ev.n_ties is not None and ev.n_decided + ev.n_ties == 500
    unlabelled = evaluate_outputs(onnx_source, "onnxruntime", onnx_source, ref, out, None, gate=0.99)
    assert unlabelled.metric == "top1_agreement" and unlabelled.top5 is None
