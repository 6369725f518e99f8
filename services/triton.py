"""Triton's extensions of the Open Inference Protocol that clients rely on: model configuration and
statistics.

Triton's tools ask for more than the protocol's core. ``perf_analyzer -i http`` reads
``GET /v2/models/{m}/config`` (Triton's model configuration extension) right after the model's metadata
and stops when it is missing; it reads ``GET /v2/models/{m}/stats`` (the statistics extension) before
and after each measurement to split the server's time into queue and compute. Both documents are
derived from the variant and from what the batcher measured, so they say what this server does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import ServingCore

PLATFORMS = {
    # runtime → (Triton platform, Triton backend) of the nearest Triton equivalent
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "tensorrt": ("tensorrt_plan", "tensorrt"),
    "torch-eager": ("pytorch_libtorch", "pytorch"),
}


TRITON_VERSION = "1"
"""Triton's tools read model versions as numbers (perf_analyzer parses the statistics' ``version`` as an
integer), so the served variant also answers as version 1; its own id stays the protocol's version."""


def triton_datatype(oip: str) -> str:
    """OIP datatype → Triton's configuration one: ``FP32`` → ``TYPE_FP32``, ``BYTES`` → ``TYPE_STRING``."""
    return "TYPE_STRING" if oip == "BYTES" else f"TYPE_{oip}"


def model_config(c: ServingCore) -> dict[str, Any]:
    """The variant as a Triton model configuration (``config.pbtxt``'s JSON form).

    With a dynamic batch axis, ``max_batch_size`` is the batcher's and ``dims`` leave the batch axis
    out, as in Triton; a fixed batch axis gives ``max_batch_size: 0`` and full shapes.
    """
    from .validation import oip_datatype

    batching = c.spec.batching
    batched = bool(c.input.shape) and c.input.shape[0] is None
    platform, backend = PLATFORMS.get(c.spec.runtime, (f"optiserve_{c.spec.runtime}", c.spec.runtime))

    def tensor(name: str, dtype: str, shape: tuple[int | None, ...]) -> dict[str, Any]:
        dims = [-1 if d is None else d for d in (shape[1:] if batched else shape)]
        return {"name": name, "data_type": triton_datatype(oip_datatype(dtype)), "dims": dims}

    outputs = [tensor(o.name, o.dtype, o.shape) for o in c.model.outputs] or [
        {"name": c.output_name, "data_type": "TYPE_FP32", "dims": [-1]}
    ]
    config: dict[str, Any] = {
        "name": c.model.name,
        "platform": platform,
        "backend": backend,
        "version_policy": {"specific": {"versions": [int(TRITON_VERSION)]}},
        "max_batch_size": batching.max_batch_size if batched else 0,
        "input": [tensor(c.input.name, c.input.dtype, c.input.shape)],
        "output": outputs,
        "instance_group": [
            {
                "name": c.model.name,
                "count": 1,
                "kind": "KIND_CPU" if c.spec.runtime != "tensorrt" else "KIND_GPU",
            }
        ],
        "parameters": {
            "variant": {"string_value": c.spec.variant.id},
            "precision": {"string_value": c.spec.variant.precision},
            "runtime": {"string_value": c.spec.runtime},
        },
    }
    if batched and batching.enabled:
        # Work-conserving: nothing waits for company, as Triton with no queue delay.
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": 0,
            "preserve_ordering": False,
            "preferred_batch_size": [c.batcher.preferred_batch_size],
        }
    return config


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)

    def doc(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Statistics:
    """Counters in the shape of Triton's statistics extension, fed by the core and the batcher.

    Updated from the event loop and the inference thread, hence the lock (a few hundred ns a call).
    """

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, _Duration] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, ok: bool, seconds: float) -> None:
        with self._lock:
            (self.success if ok else self.fail).add(seconds)

    def queue_waits(self, waits_s: list[float]) -> None:
        with self._lock:
            for w in waits_s:
                self.queue.add(w)

    def batch(self, size: int, inference_s: float) -> None:
        with self._lock:
            self.compute_infer.add(inference_s)
            self.inference_count += size
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            self.batches.setdefault(size, _Duration()).add(inference_s)

    def document(self, name: str, version: str) -> dict[str, Any]:
        """``GET /v2/models/{m}/stats``. Pre- and post-processing run inside the request, not the
        runtime, so compute_input/compute_output are zero and Triton's tools count them as overhead."""
        zero = {"count": 0, "ns": 0}
        with self._lock:
            inference_stats = {
                "success": self.success.doc(),
                "fail": self.fail.doc(),
                "queue": self.queue.doc(),
                "compute_input": {"count": self.compute_infer.count, "ns": 0},
                "compute_infer": self.compute_infer.doc(),
                "compute_output": {"count": self.compute_infer.count, "ns": 0},
                "cache_hit": zero,
                "cache_miss": zero,
            }
            batch_stats = [
                {
                    "batch_size": size,
                    "compute_input": {"count": d.count, "ns": 0},
                    "compute_infer": d.doc(),
                    "compute_output": {"count": d.count, "ns": 0},
                }
                for size, d in sorted(self.batches.items())
            ]
            stats = {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": inference_stats,
                "batch_stats": batch_stats,
                "memory_usage": [],
            }
        return {"model_stats": [stats]}
