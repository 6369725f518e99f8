"""Class names are baked into the variant when the model is resolved, and a server reports those, not
the names of whatever dataset package the serving machine has."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optiserve.models.base import BuiltinModel
from optiserve.models.resolve import resolve_model
from optiserve.services.core import ServingCore
from optiserve.types import Variant
from tests.conftest import service_spec
from tests.tiny_models import N_OUT


def test_builtin_models_carry_their_labels() -> None:
    spec = resolve_model("efficientnet-lite0")
    assert spec.labels is not None and len(spec.labels) == 1000
    assert list(spec.labels) == BuiltinModel.get("efficientnet-lite0").labels()


def test_the_server_names_classes_from_the_variant(onnx_source: Variant, variants_workdir: Path) -> None:
    names = tuple(f"class-{i}" for i in range(N_OUT))
    variant = onnx_source.model_copy(update={"model": onnx_source.model.model_copy(update={"labels": names})})
    core = ServingCore(service_spec(variant, variants_workdir, "onnxruntime"))
    try:
        logits = np.eye(N_OUT, dtype=np.float32)[[3]] * 10
        ((_, index, label), *_) = core.top_k(logits, 2)[0]
        assert (index, label) == (3, "class-3")
        # one ServingCore per process (its Prometheus metrics are process-wide): the fallback is read here
        core.labels = None
        ((_, _, fallback), *_) = core.top_k(logits, 1)[0]
        assert fallback == "3"
    finally:
        core.stop()
