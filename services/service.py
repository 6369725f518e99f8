"""The one generic BentoML service: any variant, any runtime, chosen by a ServiceSpec file.

``bentoml serve optiserve.services.service:OptiserveService`` with ``OPTISERVE_SERVICE_SPEC`` pointing
at a ``service.json`` (written by :mod:`optiserve.deploy.local`). The spec is read at import time because
BentoML's batching settings and the input validators are fixed when the API is declared.

Ready (``/readyz`` 200) only after the artifact's checksum was verified, the runtime loaded and one
warm-up inference ran.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import BadInput
from bentoml.validators import DType

from optiserve.manifest import load_variant, read_model
from optiserve.services.runtimes.base import Runtime
from optiserve.types import BatchingSpec, ServiceSpec

SPEC_ENV = "OPTISERVE_SERVICE_SPEC"


def _spec_from_env() -> ServiceSpec | None:
    path = os.environ.get(SPEC_ENV)
    return read_model(Path(path), ServiceSpec) if path else None


SPEC = _spec_from_env()
BATCHING = SPEC.batching if SPEC else BatchingSpec()
INPUT = SPEC.variant.model.inputs[0] if SPEC else None
INPUT_DTYPE = INPUT.dtype if INPUT else "float32"


@bentoml.service(name="optiserve", workers=1, traffic={"timeout": 120})
class OptiserveService:
    def __init__(self) -> None:
        if SPEC is None:
            raise RuntimeError(f"{SPEC_ENV} is not set: start this service with `optiserve serve`")
        started = time.perf_counter()
        variant = load_variant(Path(SPEC.variant_dir))
        runtime_cls = Runtime.get(SPEC.runtime)
        runtime_cls.require_available()
        self.runtime = runtime_cls(variant, Path(SPEC.variant_dir), SPEC.threads)
        self.runtime.load()
        assert INPUT is not None
        self.sample_shape = INPUT.sample_shape
        self.runtime.infer(np.zeros((1, *self.sample_shape), dtype=INPUT.dtype))  # warm-up
        self.load_seconds = time.perf_counter() - started
        self.ready = True

    def __is_ready__(self) -> bool:
        return bool(getattr(self, "ready", False))

    @bentoml.api(  # type: ignore[untyped-decorator]
        batchable=BATCHING.enabled,
        batch_dim=0,
        max_batch_size=BATCHING.max_batch_size,
        max_latency_ms=BATCHING.max_latency_ms,
    )
    def predict(self, inputs: Annotated[np.ndarray, DType(INPUT_DTYPE)]) -> np.ndarray:
        """A batch of the model's input (first axis = samples) → the model's first output."""
        assert INPUT is not None
        if inputs.ndim < 1 or not INPUT.matches(tuple(inputs.shape[1:])):
            raise BadInput(f"expected shape {INPUT.describe()}, got {inputs.shape}")
        return self.runtime.infer_any(np.ascontiguousarray(inputs, dtype=INPUT_DTYPE))
