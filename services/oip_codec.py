"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) request and response bodies.

Two encodings of the same JSON document:

- JSON: every tensor's ``data`` inline (flat row-major, or nested lists);
- the binary tensor data extension: ``Inference-Header-Content-Length: N`` says the first N bytes are
  the JSON header, and each input whose ``parameters.binary_data_size`` is set has its raw bytes
  (little-endian, row-major; BYTES elements as a 4-byte length then the bytes) after it, in order.

Parsing never raises anything but the service's client-error classes, so a malformed body is a 4xx.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optiserve.errors import InputValidationError, InvalidInput, UnsupportedMediaType

from .oip_json import dumps, load_object, tensor_from_json
from .validation import NUMPY_TO_OIP as OIP_DATATYPES_BY_NUMPY
from .validation import OIP_TO_NUMPY, check_shape_list

if TYPE_CHECKING:
    import numpy as np

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPES = ("application/json", "")
BINARY_TYPES = ("application/octet-stream", "application/vnd.kserve+binary")


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    """The tensor, for every datatype but BYTES."""
    items: list[bytes] | None = None
    """BYTES elements, row-major."""


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    binary_output: bool = False


def parse_request(body: bytes, content_type: str, header_length: str | None) -> InferRequest:
    """An infer request body → typed tensors (client errors only)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InputValidationError(
                f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}"
            ) from None
        if n < 0 or n > len(body):
            raise InputValidationError(
                f"Inference-Header-Content-Length is {n} but the body has {len(body)} bytes"
            )
        header, rest = body[:n], memoryview(body)[n:]
    else:
        if content_type not in JSON_TYPES:
            raise UnsupportedMediaType(
                f"content type {content_type!r} is not accepted; expected application/json, or binary "
                "tensor data with an Inference-Header-Content-Length header"
            )
        header, rest = body, memoryview(b"")
    doc = load_object(header)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InputValidationError("'inputs' must be a non-empty list of tensors")
    offset = 0
    inputs = []
    for k, raw in enumerate(raw_inputs):
        tensor, used = _parse_input(raw, k, rest[offset:])
        offset += used
        inputs.append(tensor)
    if offset != len(rest):
        raise InputValidationError(
            f"{len(rest) - offset} bytes of binary data follow the last input that declares binary_data_size"
        )
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputValidationError("'parameters' must be an object")
    request_id = doc.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs,
        outputs=_parse_outputs(doc.get("outputs")),
        binary_output=bool(params.get("binary_data_output", False)),
    )


def _parse_input(raw: Any, k: int, binary: memoryview) -> tuple[InputTensor, int]:
    import numpy as np

    if not isinstance(raw, dict):
        raise InputValidationError(f"inputs[{k}] must be an object with name, shape, datatype and data")
    name = raw.get("name")
    datatype = raw.get("datatype")
    if not isinstance(name, str) or not name:
        raise InputValidationError(f"inputs[{k}]: 'name' must be a non-empty string")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in OIP_TO_NUMPY):
        raise InvalidInput(
            f"input {name!r}: unknown datatype {datatype!r:.40}; expected one of "
            f"{', '.join([*OIP_TO_NUMPY, 'BYTES'])}"
        )
    shape = check_shape_list(raw.get("shape"), f"input {name!r}")
    count = math.prod(shape)
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputValidationError(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    tensor = InputTensor(name=name, datatype=datatype, shape=shape)
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputValidationError(f"input {name!r}: binary_data_size must be a non-negative integer")
        if "data" in raw:
            raise InputValidationError(f"input {name!r}: has both 'data' and binary_data_size")
        if size > len(binary):
            raise InputValidationError(
                f"input {name!r}: binary_data_size is {size} but only {len(binary)} bytes follow"
            )
        chunk = binary[:size]
        if datatype == "BYTES":
            tensor.items = _split_bytes(chunk, name)
            _check_count(name, len(tensor.items), shape)
        else:
            dtype = np.dtype(OIP_TO_NUMPY[datatype])
            if size != count * dtype.itemsize:
                need = count * dtype.itemsize
                raise InvalidInput(
                    f"input {name!r}: shape {list(shape)} of {datatype} needs {need} bytes, got {size}"
                )
            tensor.array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(shape)
        return tensor, size
    if "data" not in raw:
        raise InputValidationError(f"input {name!r}: no 'data' and no binary_data_size")
    data = raw["data"]
    if datatype == "BYTES":
        tensor.items = _json_bytes(data, name)
        _check_count(name, len(tensor.items), shape)
    else:
        tensor.array = tensor_from_json(data, datatype, OIP_TO_NUMPY[datatype], name)
        _check_count(name, tensor.array.size, shape)
        tensor.array = tensor.array.reshape(shape)
    return tensor, 0


def _check_count(name: str, got: int, shape: tuple[int, ...]) -> None:
    if got != math.prod(shape):
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} has {math.prod(shape)} elements, data has {got}"
        )


def _json_bytes(data: Any, name: str) -> list[bytes]:
    if hasattr(data, "as_list"):  # still the parser's lazy array
        data = data.as_list()
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: BYTES 'data' must be a list of strings")
    flat: list[Any] = []
    stack = [data]
    while stack:  # row-major flattening of nested lists, without recursion limits
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if not all(isinstance(x, str) for x in flat):
        raise InvalidInput(f"input {name!r}: BYTES 'data' must be strings")
    return [x.encode("utf-8") for x in flat]


def _split_bytes(chunk: memoryview, name: str) -> list[bytes]:
    items: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise InvalidInput(f"input {name!r}: truncated BYTES element length at byte {pos}")
        (length,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + length > len(chunk):
            raise InvalidInput(f"input {name!r}: BYTES element of {length} bytes runs past the data")
        items.append(bytes(chunk[pos : pos + length]))
        pos += length
    return items


def _parse_outputs(raw: Any) -> list[RequestedOutput]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InputValidationError("'outputs' must be a list")
    out = []
    for k, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InputValidationError(f"outputs[{k}] must be an object with a 'name'")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InputValidationError(f"outputs[{k}]: 'parameters' must be an object")
        binary = params.get("binary_data")
        classes = params.get("classification", 0)
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
            raise InputValidationError(f"outputs[{k}]: classification must be a non-negative integer")
        out.append(RequestedOutput(item["name"], None if binary is None else bool(binary), classes))
    return out


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    items: list[bytes] | None = None


def encode_response(
    model_name: str, version: str, request_id: str | None, outputs: list[tuple[OutputTensor, bool]]
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) for outputs, each flagged binary or JSON."""
    import numpy as np

    docs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor, binary in outputs:
        doc: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary:
            blob = (
                b"".join(struct.pack("<I", len(x)) + x for x in tensor.items)
                if tensor.items is not None
                else _le_bytes(tensor.array)
            )
            doc["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.items is not None:
            doc["data"] = [x.decode("utf-8", "replace") for x in tensor.items]
        else:
            assert tensor.array is not None
            doc["data"] = np.ascontiguousarray(tensor.array).reshape(-1)
        docs.append(doc)
    body: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": docs}
    if request_id is not None:
        body["id"] = request_id
    header = dumps(body)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def _le_bytes(array: np.ndarray | None) -> bytes:
    import numpy as np

    assert array is not None
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_json_request(name: str, array: np.ndarray) -> bytes:
    """A plain-JSON infer request for one tensor (the protocol's default encoding, which every server
    takes; outputs asked for as JSON too)."""
    import numpy as np

    return dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": OIP_DATATYPES_BY_NUMPY[str(array.dtype)],
                    "data": np.ascontiguousarray(array).reshape(-1),
                }
            ]
        }
    )


def encode_request(name: str, array: np.ndarray, *, binary_output: bool = True) -> tuple[bytes, int]:
    """A binary-extension infer request for one tensor: (body, JSON header length)."""
    import numpy as np

    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    header = dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": OIP_DATATYPES_BY_NUMPY[str(array.dtype)],
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": binary_output},
        }
    )
    return header + data, len(header)
