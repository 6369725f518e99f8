"""Property-based fuzzing (hypothesis) of every route the served variant answers, against a real server.

The Open Inference Protocol v2 (``/v2/models/{m}/infer`` as JSON and as binary tensor data; the model's
metadata, ``/ready``, ``/config`` and ``/stats``, versioned or not; unknown routes; wrong methods) and the
native routes (``/predict``, ``/classify``, ``/embed``). Requests are mostly valid in shape with random
values (NaN/Inf, huge numbers, wrong datatypes and shapes, nested lists of random depth, duplicate keys,
random unicode), or random bytes, content types and binary header lengths. Over 1,000 of them: never a
5xx, every 4xx a JSON ``{"error": ...}``, the server's processes never die or get replaced, and
well-formed requests sent in between stay as fast as before the fuzzing.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from optiserve.services.oip_codec import encode_request
from optiserve.services.validation import OIP_TO_NUMPY, oip_datatype
from optiserve.types import Endpoint
from tests.conftest import processes_mentioning, random_inputs, service_needles

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = 1200
"""Generated requests (hypothesis examples); the test requires at least MIN_FUZZ_REQUESTS of them sent."""
MIN_FUZZ_REQUESTS = 1000
GOOD_EVERY = 10
"""One well-formed request after every GOOD_EVERY generated ones, timed."""
BASELINE_REQUESTS = 100
P99_FACTOR = 2.0
P99_SLACK_S = 0.005
"""Added to the allowed p99: this runs on a shared 2-core machine where other processes take the CPU
for a few ms now and then, and a p99 of ~100 well-formed requests is their 1-2 slowest; a leak, a stuck
batcher or a degraded server is far more than 5 ms."""
ALLOWED_4XX = {400, 404, 405, 413, 415, 422}

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
DATATYPES = [*OIP_TO_NUMPY, "BYTES"]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/octet-stream",
    "application/vnd.kserve+binary",
    "image/png",
    "image/jpeg",
    "text/plain",
    "text/csv",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "",
]


# --- JSON text, including what no encoder writes --------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text inserted as is: literals no encoder writes (1e400, 40-digit integers, deep nesting)."""

    text: str


@dataclass(frozen=True)
class Obj:
    """A JSON object as its (key, value) pairs in order, so a key may appear twice."""

    pairs: tuple[tuple[str, Any], ...]


def to_json(value: Any) -> str:
    """``value`` as JSON text: floats as Python writes them (NaN, Infinity), strings unescaped (lone
    surrogates survive until :func:`encode`)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        items = (f"{json.dumps(k, ensure_ascii=False)}:{to_json(v)}" for k, v in value.pairs)
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def encode(value: Any) -> bytes:
    """JSON text → bytes; a lone surrogate becomes the invalid UTF-8 a careless client would send."""
    return to_json(value).encode("utf-8", "surrogatepass")


# --- strategies -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What the fuzzer needs to know about the served variant."""

    model: str
    version: str
    input: str
    datatype: str
    sample_shape: tuple[int, ...]
    output: str

    @property
    def width(self) -> int:
        """Numbers in one sample."""
        return math.prod(self.sample_shape)


@dataclass
class Request:
    kind: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


UNICODE = st.text(
    st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from('\x00"\\\n/%?#')),
    max_size=12,
)
ASCII_HEADER = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
RAW_LITERALS = st.sampled_from(
    [
        "1e400",
        "-1e400",
        "1e-400",
        "NaN",
        "Infinity",
        "-Infinity",
        "9" * 40,
        "-" + "9" * 25,
        "18446744073709551615",
        "-9223372036854775809",
        "0x10",
        "01",
        ".5",
        "1.",
        "+1",
        '"\\ud800"',
        '"\\u0000"',
        "tru",
        "",
    ]
).map(Raw)
FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False)
NUMBERS = st.one_of(
    FINITE,
    st.floats(),  # NaN, Inf, subnormals, float64 beyond float32's range
    st.integers(min_value=-(2**65), max_value=2**65),
    RAW_LITERALS,
)
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), UNICODE)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(UNICODE, inner), max_size=4).map(lambda p: Obj(tuple(p))),
    ),
    max_leaves=12,
)
NESTED = st.recursive(NUMBERS, lambda inner: st.lists(inner, max_size=4), max_leaves=40)
"""Nested lists of random depth and raggedness."""


def deep(depth: int, leaf: str = "1") -> Raw:
    return Raw("[" * depth + leaf + "]" * depth)


DEEP = st.sampled_from([30, 62, 63, 64, 65, 66, 100, 1023, 1024, 1025, 3000]).map(deep)


def nest(flat: list[Any], shape: list[int]) -> Any:
    """``flat`` as nested lists of ``shape`` (row-major)."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


@st.composite
def samples(draw: st.DrawFn, served: Served) -> tuple[list[int], list[Any]]:
    """The shape of n samples (n up to past the request batch limit) and that many random values."""
    n = draw(st.one_of(st.integers(1, 4), st.integers(0, 70)))
    numbers = draw(st.sampled_from([FINITE, FINITE, NUMBERS]))  # one odd number spoils a request
    values = draw(st.lists(numbers, min_size=n * served.width, max_size=n * served.width))
    return [n, *served.sample_shape], values


RANKS = st.sampled_from([3, 31, 32, 33, 63, 64, 65, 90])
"""Dimensions of a declared shape around numpy's limits (32 before numpy 2, 64 since)."""


@st.composite
def shapes(draw: st.DrawFn, served: Served) -> Any:
    """A declared shape: usually plausible, sometimes wrong rank, negative, huge, or not a shape."""
    return draw(
        st.one_of(
            st.lists(st.integers(0, 20), max_size=5),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
            RANKS.map(lambda k: [1] * k),
            RANKS.map(lambda k: [1] * k),
            st.just([1, *served.sample_shape]),
            ANY_JSON,
        )
    )


def elements(shape: Any) -> int | None:
    """The element count of a declared shape, if it is a list of dimensions and not a huge one."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    count = math.prod(shape)
    return count if count <= 4096 else None


TENSOR_MUTATIONS = [
    "nest",
    "nested",
    "data",
    "shape",
    "name",
    "datatype",
    "parameters",
    "drop",
    "repeat",
    "order",
]


@st.composite
def tensors(draw: st.DrawFn, served: Served) -> Obj:
    """One ``inputs[k]`` object: well-formed, or with a field wrong, nested, missing or repeated."""
    shape, values = draw(samples(served))
    fields: dict[str, Any] = {
        "name": served.input,
        "shape": shape,
        "datatype": served.datatype,
        "data": values,
    }
    pairs: list[tuple[str, Any]] = []
    broken = draw(st.lists(st.sampled_from(TENSOR_MUTATIONS), max_size=2))
    for mutation in broken:
        if mutation == "nest":  # regularly nested by the shape: valid too
            fields["data"] = nest(values, shape)
        elif mutation == "nested":
            fields["data"] = draw(NESTED)
        elif mutation == "data":
            fields["data"] = draw(st.one_of(DEEP, ANY_JSON))
        elif mutation == "shape":
            fields["shape"] = draw(shapes(served))
            count = elements(fields["shape"])
            if count is not None and draw(st.booleans()):  # data that fits the odd shape
                fields["data"] = draw(st.lists(FINITE, min_size=count, max_size=count))
        elif mutation == "name":
            fields["name"] = draw(st.one_of(UNICODE, SCALARS))
        elif mutation == "datatype":
            fields["datatype"] = draw(st.one_of(st.sampled_from(DATATYPES), UNICODE, ANY_JSON))
        elif mutation == "parameters":
            sizes = st.integers(-4, 2**40).map(lambda s: Obj((("binary_data_size", s),)))
            fields["parameters"] = draw(st.one_of(ANY_JSON, sizes))
        elif mutation == "drop":
            fields.pop(draw(st.sampled_from(sorted(fields))), None)
        elif mutation == "repeat":  # the same key twice, another value
            pairs.append((draw(st.sampled_from([*fields, "name"])), draw(ANY_JSON)))
    pairs = [*fields.items(), *pairs]
    if "order" in broken:
        pairs = draw(st.permutations(pairs))
    return Obj(tuple(pairs))


@st.composite
def infer_documents(draw: st.DrawFn, served: Served) -> Obj:
    """A whole infer request document: inputs, and sometimes outputs, parameters and an id."""
    one = st.lists(tensors(served), min_size=1, max_size=1)
    inputs = draw(st.one_of(one, one, one, st.lists(tensors(served), min_size=1, max_size=2), ANY_JSON))
    pairs: list[tuple[str, Any]] = [("inputs", inputs)]
    if draw(st.integers(0, 2)) == 0:
        output = Obj(
            (
                ("name", draw(st.one_of(st.just(served.output), st.just(served.output), UNICODE, SCALARS))),
                (
                    "parameters",
                    Obj(
                        (
                            ("classification", draw(st.one_of(st.integers(-2, 2**63 - 1), SCALARS))),
                            ("binary_data", draw(SCALARS)),
                        )
                    ),
                ),
            )
        )
        pairs.append(("outputs", draw(st.one_of(st.just([output]), ANY_JSON))))
    if draw(st.integers(0, 2)) == 0:
        pairs.append(("parameters", Obj((("binary_data_output", draw(SCALARS)),))))
    if draw(st.integers(0, 2)) == 0:
        pairs.append(("id", draw(ANY_JSON)))
    if draw(st.integers(0, 9)) == 0:
        pairs.append(("inputs", draw(ANY_JSON)))  # a duplicate top-level key
    return Obj(tuple(pairs))


def infer_path(served: Served, draw: st.DrawFn) -> str:
    name = draw(st.sampled_from([served.model, served.version]))
    versioned = draw(st.sampled_from(["", f"/versions/{served.version}", "/versions/1"]))
    return f"/v2/models/{name}{versioned}/infer"


def content_type(draw: st.DrawFn, usual: str) -> str:
    """Usually the route's own content type."""
    usual_ = st.just(usual)
    return draw(st.one_of(usual_, usual_, usual_, st.sampled_from(CONTENT_TYPES), ASCII_HEADER))


@st.composite
def infer_json(draw: st.DrawFn, served: Served) -> Request:
    body = encode(draw(infer_documents(served)))
    if draw(st.integers(0, 9)) == 0:  # cut short, or trailing garbage
        body = draw(
            st.one_of(st.integers(0, len(body)).map(lambda k: body[:k]), st.binary().map(body.__add__))
        )
    headers = {"content-type": content_type(draw, "application/json")}
    return Request("infer-json", "POST", infer_path(served, draw), body, headers)


BINARY_MUTATIONS = ["blob", "dtype", "shape", "name", "datatype", "size", "length", "content-type", "output"]


@st.composite
def infer_binary(draw: st.DrawFn, served: Served) -> Request:
    """The binary tensor data extension: a JSON header, then the tensor's raw bytes (random values, NaN
    and Inf among them); well-formed, or with a size, a header length or a field wrong."""
    n = draw(st.integers(0, 66))
    values = draw(
        st.one_of(
            st.integers(0, 99).map(
                lambda seed: np.random.default_rng(seed).standard_normal(n * served.width)
            ),
            st.lists(st.floats(width=32), min_size=n * served.width, max_size=n * served.width),
        )
    )
    dtype = OIP_TO_NUMPY[served.datatype]
    fields: dict[str, Any] = {
        "name": served.input,
        "shape": [n, *served.sample_shape],
        "datatype": served.datatype,
    }
    output: Any = draw(st.booleans())
    size: Any = None
    blob: bytes | None = None
    length_change: str | None = None
    content = "application/octet-stream"
    for mutation in draw(st.lists(st.sampled_from(BINARY_MUTATIONS), max_size=2)):
        if mutation == "blob":
            blob = draw(st.binary(max_size=200))
        elif mutation == "dtype":  # the bytes of another datatype
            dtype = draw(st.sampled_from(list(OIP_TO_NUMPY.values())))
        elif mutation == "shape":
            fields["shape"] = draw(shapes(served))
            count = elements(fields["shape"])
            if count is not None and draw(st.booleans()):  # bytes that fit the odd shape
                blob = bytes(count * np.dtype(dtype).itemsize)
        elif mutation == "name":
            fields["name"] = draw(st.one_of(UNICODE, SCALARS))
        elif mutation == "datatype":
            fields["datatype"] = draw(st.one_of(st.sampled_from(DATATYPES), ANY_JSON))
        elif mutation == "size":
            size = draw(st.one_of(st.integers(-3, 2**40), SCALARS))
        elif mutation == "length":
            length_change = draw(st.sampled_from(["off", "garbage", "missing"]))
        elif mutation == "content-type":
            content = draw(st.one_of(st.sampled_from(CONTENT_TYPES), ASCII_HEADER))
        elif mutation == "output":
            output = draw(ANY_JSON)
    if blob is None:
        with np.errstate(all="ignore"):  # NaN or 1e30 cast to integers: whatever bytes come out
            blob = np.asarray(values).astype(dtype).tobytes()
    if size is None:
        size = len(blob) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 4]))
    tensor = Obj((*fields.items(), ("parameters", Obj((("binary_data_size", size),)))))
    header = encode(Obj((("inputs", [tensor]), ("parameters", Obj((("binary_data_output", output),))))))
    headers = {"content-type": content, "Inference-Header-Content-Length": str(len(header))}
    if length_change == "off":
        change = draw(st.sampled_from([-30, -2, -1, 1, 2, 30, 10_000, -(10**6)]))
        headers["Inference-Header-Content-Length"] = str(len(header) + change)
    elif length_change == "garbage":
        headers["Inference-Header-Content-Length"] = draw(
            st.one_of(ASCII_HEADER, st.integers(-(2**70), 2**70).map(str))
        )
    elif length_change == "missing":
        del headers["Inference-Header-Content-Length"]
    return Request("infer-binary", "POST", infer_path(served, draw), header + blob, headers)


@st.composite
def junk_bodies(draw: st.DrawFn, served: Served) -> Request:
    """Not a request document at all: random bytes, unicode, deep nesting, any JSON value."""
    body = draw(
        st.one_of(
            st.binary(max_size=300),
            UNICODE.map(lambda s: s.encode("utf-8", "surrogatepass")),
            DEEP.map(encode),
            ANY_JSON.map(encode),
        )
    )
    path = draw(st.sampled_from([infer_path(served, draw), "/predict"]))
    headers = {"content-type": content_type(draw, "application/json")}
    if draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = draw(
            st.one_of(ASCII_HEADER, st.integers(-5, 400).map(str))
        )
    return Request("junk", "POST", path, body, headers)


@st.composite
def predict(draw: st.DrawFn, served: Served) -> Request:
    """The native ``{"inputs": [[...], ...]}``: samples of random values, or random nesting."""
    shape, values = draw(samples(served))
    inputs = draw(st.one_of(st.just(nest(values, shape)), NESTED, DEEP, ANY_JSON))
    pairs: list[tuple[str, Any]] = [("inputs", inputs)]
    if draw(st.integers(0, 5)) == 0:
        pairs.append((draw(st.one_of(st.just("inputs"), UNICODE)), draw(ANY_JSON)))
    headers = {"content-type": content_type(draw, "application/json")}
    return Request("predict", "POST", "/predict", encode(Obj(tuple(pairs))), headers)


@st.composite
def raw_routes(draw: st.DrawFn, served: Served) -> Request:
    """``/classify`` (images) and ``/embed`` (text): random bodies with their content types or others."""
    path, usual = draw(
        st.sampled_from([("/classify", "image/png"), ("/classify", "image/jpeg"), ("/embed", "text/plain")])
    )
    body = draw(
        st.one_of(
            st.binary(max_size=300),
            st.just(b"\x89PNG\r\n\x1a\n").flatmap(lambda h: st.binary(max_size=100).map(h.__add__)),
            UNICODE.map(lambda s: s.encode("utf-8", "surrogatepass")),
        )
    )
    return Request("raw", "POST", path, body, {"content-type": content_type(draw, usual)})


@st.composite
def routes(draw: st.DrawFn, served: Served) -> Request:
    """Any method on the model's routes, versioned or not, unknown names and versions, unknown routes
    under /v2, and the native routes."""
    segment = st.one_of(UNICODE, st.sampled_from(["..", ".", "", "infer", "ready", "versions"])).map(
        lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")
    )
    name = draw(st.one_of(st.sampled_from([served.model, served.version]), segment))
    version = draw(
        st.one_of(st.just(""), st.sampled_from([served.version, "1"]), segment).map(
            lambda v: v and f"/versions/{v}"
        )
    )
    tail = draw(st.sampled_from(["", "/ready", "/config", "/stats", "/infer"]))
    path = draw(
        st.one_of(
            st.just(f"/v2/models/{name}{version}{tail}"),
            st.sampled_from(
                ["/v2", "/v2/health/live", "/v2/health/ready", "/predict", "/classify", "/embed"]
            ),
            st.lists(segment, min_size=1, max_size=4).map(lambda s: "/v2/" + "/".join(s)),
        )
    )
    method = draw(st.sampled_from(METHODS))
    body = draw(st.one_of(st.just(b""), st.binary(max_size=50), ANY_JSON.map(encode)))
    return Request("route", method, path, body, {"content-type": content_type(draw, "application/json")})


def requests(served: Served) -> st.SearchStrategy[Request]:
    """Weighted towards the infer endpoint, where the parsing is."""
    weighted = [
        *[infer_json(served)] * 3,
        *[infer_binary(served)] * 3,
        *[predict(served)] * 2,
        junk_bodies(served),
        raw_routes(served),
        routes(served),
    ]
    return st.sampled_from(weighted).flatmap(lambda strategy: strategy)


# --- the test -------------------------------------------------------------------------------------------


def found_by_fuzzing(served: Served) -> list[Request]:
    """The 5xx answers this test found (each fixed with a 4xx), run as explicit examples every time."""
    infer = f"/v2/models/{served.model}/infer"
    as_json = {"content-type": "application/json"}
    tensor = {"name": served.input, "shape": [1, *served.sample_shape], "datatype": served.datatype}
    values = [0.5] * served.width
    high_rank = {**tensor, "shape": [1] * 70, "parameters": {"binary_data_size": 4}}
    header = json.dumps({"inputs": [high_rank]}).encode()
    return [
        # A datatype that is not a string: "unhashable type: 'list'" (oip_codec).
        Request(
            "found",
            "POST",
            infer,
            json.dumps({"inputs": [{**tensor, "datatype": [], "data": values}]}).encode(),
            as_json,
        ),
        # A key with a NUL character: simdjson lists it but cannot look it up (oip_json).
        Request("found", "POST", infer, b'{"inputs":[{}],"outputs":{"\\u0000":[]}}', as_json),
        Request("found", "POST", infer, b'{"inputs":[{"\\u0000":1}]}', as_json),
        # More dimensions than a numpy array can have (validation): JSON and binary.
        Request(
            "found",
            "POST",
            infer,
            json.dumps({"inputs": [{**tensor, "shape": [1] * 70, "data": [0.5]}]}).encode(),
            as_json,
        ),
        Request(
            "found",
            "POST",
            infer,
            header + bytes(4),
            {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        ),
    ]


def served_of(endpoint: Endpoint) -> Served:
    model = endpoint.service.variant.model
    spec = model.inputs[0]
    return Served(
        model=model.name,
        version=endpoint.service.variant.id,
        input=spec.name,
        datatype=oip_datatype(spec.dtype),
        sample_shape=spec.sample_shape,
        output=model.outputs[0].name if model.outputs else "output",
    )


def ours(path: str) -> bool:
    """Whether optiserve's app answers ``path`` (decoded, as sent: the client drops ``.`` and ``..``
    segments), a newline (``%0A``) included. Other paths are BentoML's own (``/readyz``, ``/metrics``,
    and its plain-text 404), outside the protocol; for those only "never a 5xx" holds."""
    return path == "/v2" or path.startswith("/v2/") or path in ("/predict", "/classify", "/embed")


def problem(request: Request, response: httpx.Response) -> str | None:
    """What is wrong with the answer to a generated request, if anything."""
    status = response.status_code
    if status >= 500 or status < 200:
        return f"HTTP {status}: {response.text[:200]}"
    if status < 400 or not ours(response.request.url.path):
        return None
    if status not in ALLOWED_4XX:
        return f"HTTP {status}: {response.text[:200]}"
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"HTTP {status} is not JSON: {response.headers.get('content-type')!r} {response.text[:120]!r}"
    if request.method == "HEAD":
        return None  # no body to a HEAD, by HTTP's rules
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return f"HTTP {status} with a body that is not a JSON object: {response.text[:120]!r}"
    return (
        None if isinstance(error, str) and error else f"HTTP {status} without an error: {response.text[:120]}"
    )


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    good_s: list[float] = field(default_factory=list)
    outside: int = 0
    """Requests whose path (after the client dropped dot segments) left optiserve's routes."""

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


class GoodRequest:
    """The well-formed request whose latency is watched: one binary sample, as the load tests send."""

    def __init__(self, endpoint: Endpoint) -> None:
        body, length = encode_request(endpoint.service.variant.model.inputs[0].name, random_inputs(1, seed=9))
        self.body = body
        self.headers = {
            "content-type": "application/octet-stream",
            "Inference-Header-Content-Length": str(length),
        }
        self.path = endpoint.infer_url.removeprefix(endpoint.url)

    def time(self, client: httpx.Client) -> float:
        started = time.perf_counter()
        response = client.post(self.path, content=self.body, headers=self.headers)
        took = time.perf_counter() - started
        assert response.status_code == 200, response.text
        return took


def p99(seconds: list[float]) -> float:
    return float(np.percentile(seconds, 99))


def server_processes(workdir: Path, port: int) -> set[tuple[int, float]]:
    """(pid, start time) of the server's processes: a worker that died and was restarted differs."""
    found = set()
    for p in processes_mentioning(*service_needles(workdir, port)):
        try:
            found.add((p.pid, p.create_time()))
        except psutil.Error:
            continue
    return found


def test_fuzzed_requests_never_get_a_5xx_nor_slow_the_server(
    mlp_endpoint: Endpoint, variants_workdir: Path, figures: Callable[[str, object], None]
) -> None:
    served = served_of(mlp_endpoint)
    good = GoodRequest(mlp_endpoint)
    tally = Tally()
    port = mlp_endpoint.service.port
    assert port is not None
    processes = server_processes(variants_workdir, port)
    assert processes, "the server's processes were not found"

    with httpx.Client(base_url=mlp_endpoint.url, timeout=30) as client:
        for _ in range(10):  # connection and server warm-up, not measured
            good.time(client)
        baseline = [good.time(client) for _ in range(BASELINE_REQUESTS)]

        @settings(
            max_examples=FUZZ_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            print_blob=True,
            suppress_health_check=[
                HealthCheck.function_scoped_fixture,
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.filter_too_much,
            ],
        )
        @given(request=requests(served))
        def fuzz(request: Request) -> None:
            response = client.request(
                request.method, request.path, content=request.body, headers=request.headers
            )
            tally.statuses[response.status_code] += 1
            tally.by_kind[request.kind] += 1
            tally.outside += not ours(response.request.url.path)
            if tally.sent % GOOD_EVERY == 0:
                tally.good_s.append(good.time(client))
            wrong = problem(request, response)
            assert wrong is None, (
                f"{request.method} {request.path} {request.headers} {request.body[:300]!r}: {wrong}"
            )

        for case in found_by_fuzzing(served):  # run first, every time
            fuzz = example(request=case)(fuzz)
        fuzz()
        ready = client.get("/v2/health/ready")

    n_5xx = sum(n for s, n in tally.statuses.items() if s >= 500)
    before_ms, during_ms = p99(baseline) * 1e3, p99(tally.good_s) * 1e3
    alive = server_processes(variants_workdir, port) >= processes
    summary = (
        f"fuzz: {tally.sent} generated requests ({dict(sorted(tally.by_kind.items()))}; "
        f"{tally.outside} left optiserve's routes); by status {dict(sorted(tally.statuses.items()))}; "
        f"5xx: {n_5xx}; well-formed p99 {before_ms:.2f} ms before ({len(baseline)} requests), "
        f"{during_ms:.2f} ms during ({len(tally.good_s)} requests)"
    )
    print(summary)
    figures("fuzz: generated requests / 5xx", f"{tally.sent} / {n_5xx}")
    figures("fuzz: by status", " ".join(f"{s}:{n}" for s, n in sorted(tally.statuses.items())))
    figures("fuzz: well-formed p99 before / during", f"{before_ms:.2f} / {during_ms:.2f} ms")
    figures("fuzz: server processes alive and ready", f"{alive and ready.status_code == 200}")
    assert tally.sent >= MIN_FUZZ_REQUESTS, summary
    assert ready.status_code == 200, ready.text
    assert alive, "a server process died or was replaced"
    assert during_ms / 1e3 <= P99_FACTOR * before_ms / 1e3 + P99_SLACK_S, summary
