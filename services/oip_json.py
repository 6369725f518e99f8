"""JSON for the Open Inference Protocol, fast enough for image tensors in ``data``.

A 224×224 RGB image is a 3.1 MB JSON body of 150,528 numbers. The standard library takes ~50 ms to parse
it into Python floats, orjson ~10 ms plus ~3.5 ms to turn the floats into an array; simdjson (PyPI
``pysimdjson``) parses the document in ~4 ms and copies a numeric array straight into a buffer without
creating a Python object per element, so the tensor never exists as Python floats. Responses are
written by orjson, which serializes numpy arrays natively.

Every malformed document is an :class:`~optiserve.errors.InputValidationError` (400) and every
well-formed document whose tensor data does not fit its datatype an
:class:`~optiserve.errors.InvalidInput` (422): invalid UTF-8, trailing bytes, NaN/Infinity literals
(not JSON), numbers out of the float64/64-bit range, nesting deeper than :data:`MAX_DEPTH`,
duplicate keys (which a parser would otherwise resolve silently, one way or the other) and keys with a
NUL character are all refused.

Without pysimdjson (a client-only install) the same rules hold through the standard library, slower.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from optiserve.errors import InputValidationError, InvalidInput

if TYPE_CHECKING:
    import numpy as np

MAX_DEPTH = 64
"""How deep the protocol's objects may nest outside tensor data (the protocol itself needs 4)."""
LAZY_KEY = "data"
"""Inside ``inputs[k]``, this stays the parser's own array until :func:`tensor_from_json` reads it."""


def load_object(raw: bytes | memoryview) -> dict[str, Any]:
    """A request document → a dict; each ``inputs[k]["data"]`` stays lazy for :func:`tensor_from_json`."""
    try:
        import simdjson
    except ImportError:
        return _load_stdlib(bytes(raw))
    try:
        doc = simdjson.Parser().parse(bytes(raw) if isinstance(raw, memoryview) else raw)
    except UnicodeDecodeError as e:
        raise InputValidationError("the request is not valid JSON: it is not UTF-8") from e
    except (ValueError, RuntimeError, TypeError) as e:
        raise InputValidationError(f"the request is not valid JSON: {_reason(e)}") from e
    if not isinstance(doc, simdjson.Object):
        raise InputValidationError(f"the request must be a JSON object, got {_kind(doc)}")
    return _to_python(doc, simdjson, lazy_inputs=True)  # type: ignore[no-any-return]


def _to_python(value: Any, simdjson: Any, lazy_inputs: bool = False, depth: int = 0) -> Any:
    """simdjson's document → dicts and lists, refusing duplicate keys and deep nesting."""
    if depth > MAX_DEPTH:
        raise InputValidationError(f"the request nests deeper than {MAX_DEPTH} levels outside tensor data")
    if isinstance(value, simdjson.Object):
        out = {}
        for k in _checked_keys(list(value.keys())):
            if lazy_inputs and k == "inputs" and isinstance(value[k], simdjson.Array):
                out[k] = [_input(item, simdjson, depth + 2) for item in value[k]]
            else:
                out[k] = _to_python(value[k], simdjson, depth=depth + 1)
        return out
    if isinstance(value, simdjson.Array):
        return [_to_python(item, simdjson, depth=depth + 1) for item in value]
    return value


def _input(item: Any, simdjson: Any, depth: int) -> Any:
    """One input tensor's object, its ``data`` left as the parser's array."""
    if not isinstance(item, simdjson.Object):
        return _to_python(item, simdjson, depth=depth)
    out = {}
    for k in _checked_keys(list(item.keys())):
        lazy = k == LAZY_KEY and isinstance(item[k], simdjson.Array)
        out[k] = item[k] if lazy else _to_python(item[k], simdjson, depth=depth + 1)
    return out


def _checked_keys(keys: list[str]) -> list[str]:
    """An object's keys, if each appears once and none holds a NUL character: simdjson lists such a
    key but cannot look it up (a 500, found by fuzzing), and no protocol field has one."""
    if any("\x00" in k for k in keys):
        raise InputValidationError("a key of a JSON object contains a NUL character (\\u0000)")
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InputValidationError(f"duplicate key {dup!r:.60} in a JSON object; each key must appear once")
    return keys


def _load_stdlib(raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        _checked_keys([k for k, _ in pairs])
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise InputValidationError(f"the request is not valid JSON: {name} is not a JSON number")

    try:
        doc = json.loads(raw, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except RecursionError as e:
        raise InputValidationError("the request is not valid JSON: it nests too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise InputValidationError(f"the request is not valid JSON: {str(e)[:120]}") from e
    if not isinstance(doc, dict):
        raise InputValidationError(f"the request must be a JSON object, got {type(doc).__name__}")
    return doc


def _reason(e: BaseException) -> str:
    """simdjson's error code, in words a client can act on."""
    text = str(e)
    for code, words in (
        ("DEPTH_ERROR", "it nests too deeply"),
        ("BIGINT_ERROR", "an integer does not fit in 64 bits"),
        ("NUMBER_ERROR", "a number is malformed or out of range"),
        ("TAPE_ERROR", "its structure is broken (a missing or extra character, or a NaN/Infinity literal)"),
        ("EMPTY", "the body is empty"),
        ("UTF8_ERROR", "it is not UTF-8"),
        ("STRING_ERROR", "a string is malformed"),
        ("UNCLOSED_STRING", "a string is not closed"),
    ):
        if code in text:
            return words
    return text.split(":")[0][:80]


def _kind(value: Any) -> str:
    return {"Array": "an array", "str": "a string", "NoneType": "null"}.get(type(value).__name__, "a scalar")


def tensor_from_json(data: Any, datatype: str, numpy_dtype: str, name: str) -> np.ndarray:
    """A tensor's ``data`` (flat row-major, or regularly nested lists) → a 1-d array of ``numpy_dtype``.

    Numbers only for numeric datatypes (never booleans, strings or nulls), integers only for integer
    ones, each within its datatype's range; true/false only for BOOL.
    """
    import numpy as np

    dtype = np.dtype(numpy_dtype)
    if not isinstance(data, list):
        if not _is_lazy_array(data):
            raise InvalidInput(f"input {name!r}: 'data' must be a list of numbers")
        if dtype.kind != "b":
            return _from_simdjson(data, datatype, dtype, name)
        data = data.as_list()
    return _from_list(data, datatype, dtype, name)


def _is_lazy_array(value: Any) -> bool:
    try:
        import simdjson
    except ImportError:
        return False
    return isinstance(value, simdjson.Array)


def _wanted(datatype: str, dtype: np.dtype[Any]) -> str:
    return {"b": "true/false", "i": "integers", "u": "non-negative integers"}.get(dtype.kind, "numbers")


def _from_simdjson(data: Any, datatype: str, dtype: np.dtype[Any], name: str) -> np.ndarray:
    import numpy as np

    expected = _regular_count(data, name)
    of_type, raw_dtype = {"f": ("d", np.float64), "i": ("i", np.int64), "u": ("u", np.uint64)}[dtype.kind]
    try:
        flat = np.frombuffer(data.as_buffer(of_type=of_type), dtype=raw_dtype)
    except TypeError as e:
        raise InvalidInput(f"input {name!r}: {datatype} data must be {_wanted(datatype, dtype)}") from e
    except (ValueError, RuntimeError) as e:
        raise InvalidInput(f"input {name!r}: values outside the {datatype} range") from e
    if flat.size != expected:
        raise InvalidInput(f"input {name!r}: 'data' nests lists inside its numbers")
    return _in_range(flat, datatype, dtype, name)


def _regular_count(data: Any, name: str) -> int:
    """The element count of a flat or regularly nested array (every list on a level as long as the
    first); a ragged one is refused. Only the lists are visited, never the numbers."""
    import simdjson

    level = [data]
    count = 1
    while True:
        width = len(level[0])
        if any(len(a) != width for a in level):
            raise InvalidInput(f"input {name!r}: 'data' is a ragged nested list")
        count *= width
        if width == 0 or not isinstance(level[0][0], simdjson.Array):
            return count
        below: list[Any] = []
        for a in level:
            below.extend(a)
        if not all(isinstance(a, simdjson.Array) for a in below):
            raise InvalidInput(f"input {name!r}: 'data' is a ragged nested list")
        level = below


def _from_list(data: list[Any], datatype: str, dtype: np.dtype[Any], name: str) -> np.ndarray:
    import numpy as np

    try:
        loose = np.asarray(data)
    except ValueError as e:  # ragged nesting
        raise InvalidInput(f"input {name!r}: 'data' is a ragged nested list ({str(e)[:80]})") from e
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]  # never bools as numbers
    if loose.size and loose.dtype.kind not in allowed:
        wanted = _wanted(datatype, dtype)
        raise InvalidInput(f"input {name!r}: {datatype} data must be {wanted}, got {loose.dtype.name} values")
    return _in_range(loose.reshape(-1), datatype, dtype, name)


def _in_range(flat: np.ndarray, datatype: str, dtype: np.dtype[Any], name: str) -> np.ndarray:
    import numpy as np

    if dtype.kind in "iu" and flat.size:
        info = np.iinfo(dtype)
        if flat.min() < info.min or flat.max() > info.max:
            raise InvalidInput(f"input {name!r}: values outside the {datatype} range")
    return flat.astype(dtype, copy=False)


def dumps(doc: Any) -> bytes:
    """A response document → bytes; numpy arrays inside are written without Python floats."""
    try:
        import orjson
    except ImportError:
        return json.dumps(doc, separators=(",", ":"), default=_tolist).encode()
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY, default=_tolist)  # type: ignore[no-any-return]


def _tolist(value: Any) -> Any:
    """What orjson cannot write itself (float16, non-contiguous or big-endian arrays)."""
    tolist = getattr(value, "tolist", None)
    if tolist is None:
        raise TypeError(f"{type(value).__name__} is not JSON serializable")
    out = tolist()
    if isinstance(out, float) and not math.isfinite(out):
        return None
    return out
