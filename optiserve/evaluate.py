"""Accuracy of each variant, in process, against the FP32 reference on held-out inputs.

For classifiers (2-D outputs with more than one class) the metric is top-1 agreement with the
reference; otherwise the largest absolute difference. Inference runs through the same Runtime
classes the service uses, so what is evaluated is what is served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optiserve.manifest import variant_dir
from optiserve.services.runtimes.base import Runtime
from optiserve.types import Evaluation, ThreadSpec, Variant


def outputs_of(
    variant: Variant, runtime_name: str, workdir: Path, inputs: np.ndarray, threads: ThreadSpec
) -> np.ndarray:
    runtime = Runtime.get(runtime_name)(variant, variant_dir(workdir, variant.id), threads)
    runtime.load()
    return runtime.infer_any(inputs, chunk=16)


def compare(
    variant: Variant, runtime: str, reference: Variant, ref_out: np.ndarray, out: np.ndarray
) -> Evaluation:
    diff = float(np.abs(out.astype(np.float64) - ref_out.astype(np.float64)).max())
    if ref_out.ndim == 2 and ref_out.shape[1] > 1:
        agreement = float((out.argmax(axis=1) == ref_out.argmax(axis=1)).mean())
        return Evaluation(
            variant_id=variant.id,
            runtime=runtime,
            reference_variant_id=reference.id,
            metric="top1_agreement",
            value=agreement,
            n_samples=len(out),
            max_abs_diff=diff,
        )
    return Evaluation(
        variant_id=variant.id,
        runtime=runtime,
        reference_variant_id=reference.id,
        metric="max_abs_diff",
        value=diff,
        n_samples=len(out),
        max_abs_diff=diff,
    )
