"""Checks a request's tensor against the model's input spec before anything reaches a runtime.

Every failure is a client mistake with a message that names what was expected: 422 for a tensor that
is well-formed but does not fit (shape, datatype, element count, NaN/Inf, out-of-range ids), 413 for
more samples than one request may carry. Nothing here can raise anything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optiserve.errors import InvalidInput, PayloadTooLarge

if TYPE_CHECKING:
    import numpy as np

    from optiserve.types import ServingLimits, TensorSpec

# Open Inference Protocol v2 datatypes ↔ numpy dtype names.
OIP_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_OIP: dict[str, str] = {v: k for k, v in OIP_TO_NUMPY.items()}


def oip_datatype(dtype: str) -> str:
    return NUMPY_TO_OIP[dtype]


MAX_RANK = 32
"""The most dimensions a declared shape may have: numpy's arrays stop at 64 (32 before numpy 2), and a
shape past that was a 500 when the tensor was reshaped; no model's input comes near."""


def check_shape_list(shape: object, what: str) -> tuple[int, ...]:
    """A declared shape: a list of at most :data:`MAX_RANK` non-negative integers."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{what}: shape must be a list of integers, got {shape!r:.80}")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"{what}: shape has {len(shape)} dimensions; at most {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what}: shape must not have negative dimensions, got {shape}")
    return tuple(shape)


def check_tensor(
    spec: TensorSpec,
    array: np.ndarray,
    limits: ServingLimits,
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """``array`` (first axis = samples) if it fits ``spec``; else InvalidInput / PayloadTooLarge."""
    import numpy as np

    name = spec.name
    expected = f"expected shape {spec.describe()}"
    if array.dtype != np.dtype(spec.dtype):
        raise InvalidInput(
            f"input {name!r}: expected datatype {oip_datatype(spec.dtype)} ({spec.dtype}), got {array.dtype}"
        )
    if array.ndim < 1 or not spec.matches(tuple(array.shape[1:])):
        raise InvalidInput(f"input {name!r}: {expected}, got {tuple(array.shape)}")
    n = array.shape[0]
    if n < 1:
        raise InvalidInput(f"input {name!r}: the batch is empty; {expected} with n >= 1")
    if n > limits.max_request_batch:
        raise PayloadTooLarge(
            f"input {name!r}: {n} samples in one request; at most {limits.max_request_batch} "
            "(split the request, or raise limits.max_request_batch)"
        )
    # min and max also find NaN (it propagates) and ±Inf (it is an extreme): no third pass over the
    # tensor for an isfinite() mask when bounds are checked anyway.
    check_finite = array.dtype.kind == "f" and limits.non_finite == "reject"
    if (check_finite or bounds is not None) and array.size:
        lo, hi = array.min(), array.max()
        if check_finite and not (np.isfinite(lo) and np.isfinite(hi)):
            raise InvalidInput(f"input {name!r}: contains NaN or Inf; expected finite values")
    if bounds is not None and array.size:
        low, high = bounds
        if lo < low or hi > high:
            raise InvalidInput(
                f"input {name!r}: values must lie in [{low:g}, {high:g}], got [{float(lo):g}, {float(hi):g}]"
            )
    return np.ascontiguousarray(array)
