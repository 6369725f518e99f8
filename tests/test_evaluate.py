"""Evaluation helpers that benchmarks print."""

from __future__ import annotations

import numpy as np

from optiserve.evaluate import agreement_by_margin


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
