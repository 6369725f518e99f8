"""A corpus of malformed requests (hand-made and generated) against a real server: never a 5xx, and
the server answers correct requests just as well afterwards."""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from optiserve.services.oip_codec import encode_request
from optiserve.types import Endpoint
from tests.conftest import random_inputs

pytestmark = pytest.mark.slow


@dataclass
class Bad:
    what: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    method: str = "POST"


def oip_json(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def tensor(**fields: object) -> bytes:
    base: dict[str, object] = {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
    base.update(fields)
    return json.dumps({"inputs": [{k: v for k, v in base.items() if v is not ...}]}).encode()


def deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def hand_made(infer: str) -> list[Bad]:
    binary, n = encode_request("input", random_inputs(1))
    bin_headers = {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(n)}
    return [
        Bad("empty body", infer, b""),
        Bad("not json", infer, b"{nope"),
        Bad("json array", infer, b"[1, 2]"),
        Bad("json string", infer, b'"x"'),
        Bad("no inputs", infer, b"{}"),
        Bad("inputs not a list", infer, oip_json(inputs="x")),
        Bad("empty inputs", infer, oip_json(inputs=[])),
        Bad("input not an object", infer, oip_json(inputs=[1])),
        Bad("two inputs", infer, oip_json(inputs=[json.loads(tensor())["inputs"][0]] * 2)),
        Bad("no name", infer, tensor(name=...)),
        Bad("name not a string", infer, tensor(name=7)),
        Bad("unknown name", infer, tensor(name="x")),
        Bad("no datatype", infer, tensor(datatype=...)),
        Bad("unknown datatype", infer, tensor(datatype="FP128")),
        Bad("wrong datatype", infer, tensor(datatype="INT64", data=[1] * 16)),
        Bad("no shape", infer, tensor(shape=...)),
        Bad("shape not a list", infer, tensor(shape="1,16")),
        Bad("negative shape", infer, tensor(shape=[-1, 16])),
        Bad("float shape", infer, tensor(shape=[1.5, 16])),
        Bad("wrong rank", infer, tensor(shape=[16])),
        Bad("wrong width", infer, tensor(shape=[1, 15], data=[0.5] * 15)),
        Bad("count mismatch", infer, tensor(data=[0.5] * 15)),
        Bad("zero batch", infer, tensor(shape=[0, 16], data=[])),
        Bad("no data", infer, tensor(data=...)),
        Bad("data not a list", infer, tensor(data="abc")),
        Bad("strings as FP32", infer, tensor(data=["a"] * 16)),
        Bad("bools as FP32", infer, tensor(data=[True] * 16)),
        Bad("nulls", infer, tensor(data=[None] * 16)),
        Bad("ragged", infer, tensor(data=[[0.5] * 8, [0.5] * 7])),
        Bad("nested dicts", infer, tensor(data=[{"a": 1}] * 16)),
        Bad(
            "NaN",
            infer,
            b'{"inputs":[{"name":"input","shape":[1,16],"datatype":"FP32","data":[NaN' + b",0" * 15 + b"]}]}",
        ),
        Bad("Infinity", infer, tensor(data=[float("inf")] * 16)),
        Bad("huge batch", infer, tensor(shape=[100, 16], data=[0.5] * 1600)),
        Bad("BYTES to a tensor model", infer, tensor(datatype="BYTES", shape=[1], data=["x"])),
        Bad("parameters not object", infer, tensor(parameters=3)),
        Bad("binary size negative", infer, tensor(data=..., parameters={"binary_data_size": -1})),
        Bad("binary size missing bytes", infer, tensor(data=..., parameters={"binary_data_size": 64})),
        Bad("outputs not a list", infer, oip_json(outputs=3)),
        Bad("unknown output", infer, oip_json(outputs=[{"name": "nope"}])),
        Bad(
            "negative classification",
            infer,
            oip_json(outputs=[{"name": "x", "parameters": {"classification": -2}}]),
        ),
        Bad("request params not object", infer, oip_json(parameters=[1])),
        Bad("csv content type", infer, b"1,2,3", {"content-type": "text/csv"}),
        Bad("form content type", infer, oip_json(), {"content-type": "application/x-www-form-urlencoded"}),
        Bad(
            "header length not int", infer, binary, {**bin_headers, "Inference-Header-Content-Length": "ten"}
        ),
        Bad(
            "header length too big",
            infer,
            binary,
            {**bin_headers, "Inference-Header-Content-Length": "99999"},
        ),
        Bad(
            "header length negative", infer, binary, {**bin_headers, "Inference-Header-Content-Length": "-4"}
        ),
        Bad(
            "header length cuts json",
            infer,
            binary,
            {**bin_headers, "Inference-Header-Content-Length": str(n - 3)},
        ),
        Bad("binary truncated", infer, binary[:-5], bin_headers),
        Bad("binary extra bytes", infer, binary + b"\0\0\0\0", bin_headers),
        Bad("unknown model", infer.replace("/models/", "/models/x"), oip_json()),
        Bad("unknown version", infer.replace("/infer", "/versions/9/infer"), oip_json()),
        Bad("GET infer", infer, b"", method="GET"),
        Bad("too large body", infer, b"0" * (33 * 1024 * 1024)),
        # What a fast JSON parser must still refuse (issue 14): each a 4xx with a JSON error.
        Bad("deep nesting, whole body", infer, b"[" * 5000 + b"]" * 5000),
        Bad(
            "deep nesting in data",
            infer,
            tensor(data=...)[:-3] + b',"data":' + b"[" * 5000 + b"]" * 5000 + b"}]}",
        ),
        Bad("deep nesting in parameters", infer, oip_json(parameters=deep(500))),
        Bad("huge float", infer, tensor(data=...)[:-3] + b',"data":[1e400' + b",0" * 15 + b"]}]}"),
        Bad("huge integer", infer, tensor(data=...)[:-3] + b',"data":[' + b"9" * 40 + b",0" * 15 + b"]}]}"),
        Bad("integer beyond INT64", infer, tensor(datatype="INT64", data=[2**63] + [0] * 15)),
        Bad(
            "Infinity literal",
            infer,
            b'{"inputs":[{"name":"input","shape":[1,16],"datatype":"FP32","data":[Infinity'
            + b",0" * 15
            + b"]}]}",
        ),
        Bad("duplicate top-level key", infer, oip_json()[:-1] + b', "inputs": []}'),
        Bad("duplicate tensor key", infer, tensor()[:-3] + b',"name":"other"}]}'),
        Bad("a list inside the numbers", infer, tensor(data=[0.5] * 14 + [[0.5, 0.5]])),
        Bad("a string inside the numbers", infer, tensor(data=[0.5] * 15 + ["0.5"])),
        Bad("trailing garbage", infer, oip_json() + b" x"),
        Bad("invalid UTF-8 in a string", infer, tensor(name="XX").replace(b'"XX"', b'"\xff"')),
        Bad("unknown route under /v2", "/v2/nothing/here", b"{}"),
        Bad("unknown route under a model", infer.replace("/infer", "/nothing"), b"{}"),
        # Starlette's route patterns stop at a newline: BentoML's router used to answer these in text
        Bad("a newline in a /v2 route", "/v2/nothing%0Ahere", b"{}"),
        Bad("a newline in the model's name", infer.replace("/infer", "%0A/infer"), b"{}"),
        Bad("DELETE a model", infer.removesuffix("/infer"), b"", method="DELETE"),
        Bad("predict: wrong shape", "/predict", b'{"inputs": [[0.5, 0.5]]}'),
        Bad("predict: strings", "/predict", b'{"inputs": [["a"]]}'),
        Bad("predict: not json", "/predict", b"{{{"),
        Bad("predict: no inputs", "/predict", b'{"x": 1}'),
        Bad("predict: NaN", "/predict", b'{"inputs": [[NaN' + b",0" * 15 + b"]]}"),
        Bad("classify a tensor model", "/classify", b"\x89PNG....", {"content-type": "image/png"}),
        Bad("embed on a tensor model", "/embed", b"hello", {"content-type": "text/plain"}),
    ]


def generated(infer: str, count: int, seed: int = 7) -> Iterator[Bad]:
    """Random damage to a valid binary request: truncations, byte flips, wrong header lengths."""
    rng = random.Random(seed)
    valid, n = encode_request("input", random_inputs(2, seed=3))
    for k in range(count):
        body = bytearray(valid)
        header_length = n
        action = k % 4
        if action == 0:  # cut anywhere
            body = body[: rng.randrange(0, len(body))]
        elif action == 1:  # flip bytes inside the JSON header
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(0, n)
                body[pos] = rng.choice(b'{}[]":,0123456789x\xff')
        elif action == 2:  # a header length that is off
            header_length = n + rng.choice([-30, -2, -1, 1, 2, 30, 10_000])
        else:  # garbage of random size, random content type
            body = bytearray(rng.randbytes(rng.randint(0, 2000)))
        headers = {
            "content-type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
        }
        if action == 3 and rng.random() < 0.5:
            headers = {"content-type": rng.choice(["application/json", "image/png", "text/plain"])}
        yield Bad(f"generated #{k} (action {action})", infer, bytes(body), headers)


def good_latencies(client: httpx.Client, endpoint: Endpoint, n: int = 30) -> list[float]:
    body, length = encode_request("input", random_inputs(1, seed=9))
    headers = {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(length)}
    out = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post(endpoint.infer_url, content=body, headers=headers)
        out.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return out


def test_malformed_requests_never_get_a_5xx_and_leave_the_server_healthy(
    mlp_endpoint: Endpoint, figures: Callable[[str, object], None]
) -> None:
    infer = mlp_endpoint.infer_url.removeprefix(mlp_endpoint.url)
    corpus = hand_made(infer) + list(generated(infer, 80))
    assert len(corpus) >= 100
    with httpx.Client(base_url=mlp_endpoint.url, timeout=30) as client:
        before = good_latencies(client, mlp_endpoint)
        failures = []
        statuses: dict[int, int] = {}
        for bad in corpus:
            response = client.request(bad.method, bad.path, content=bad.body, headers=bad.headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500 or response.status_code < 400:
                failures.append(f"{bad.what}: {response.status_code} {response.text[:120]}")
            else:
                assert response.headers.get("content-type", "").startswith("application/json"), (
                    bad.what,
                    response.text[:80],
                )
                assert response.json().get("error"), bad.what  # every 4xx says, in JSON, what was wrong
        figures(
            "hand corpus + damaged binary: requests / 5xx",
            f"{len(corpus)} / {sum(n for c, n in statuses.items() if c >= 500)}",
        )
        assert not failures, "\n".join(failures)
        assert set(statuses) <= {400, 404, 405, 413, 415, 422}, statuses
        assert client.get("/v2/health/ready").status_code == 200
        after = good_latencies(client, mlp_endpoint)
    # "Still fast": a hang or a leak would be orders of magnitude, not noise.
    assert statistics.median(after) < 5 * statistics.median(before) + 0.05, (before, after)
    assert np.isfinite(after).all()
