"""The Open Inference Protocol v2 REST API of a real served variant, driven by Triton's own client."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from optiserve.types import Endpoint, Variant
from tests.conftest import random_inputs
from tests.services.test_service import in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(mlp_endpoint: Endpoint) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(mlp_endpoint.url.removeprefix("http://"))


def names(endpoint: Endpoint) -> tuple[str, str]:
    return endpoint.service.variant.model.name, endpoint.service.variant.id


def test_health_and_metadata(client: triton.InferenceServerClient, mlp_endpoint: Endpoint) -> None:
    model, variant = names(mlp_endpoint)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model) and client.is_model_ready(variant)
    server = client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(model)
    assert meta["versions"] == [variant]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"][0]["datatype"] == "FP32"
    assert client.get_model_metadata(model, model_version=variant)["name"] == model


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_infer_matches_in_process_onnxruntime(
    client: triton.InferenceServerClient,
    mlp_endpoint: Endpoint,
    onnx_source: Variant,
    variants_workdir: Path,
    binary_in: bool,
    binary_out: bool,
) -> None:
    x = random_inputs(3, seed=5)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    output_name = mlp_endpoint.service.variant.model.outputs[0].name
    result = client.infer(
        names(mlp_endpoint)[0],
        [inp],
        outputs=[triton.InferRequestedOutput(output_name, binary_data=binary_out)],
        request_id="r-1",
    )
    assert result.get_response()["id"] == "r-1"
    np.testing.assert_allclose(
        result.as_numpy(output_name), in_process(onnx_source, variants_workdir, x), rtol=1e-5, atol=1e-5
    )


def test_classification_extension_returns_the_top_classes(
    client: triton.InferenceServerClient, mlp_endpoint: Endpoint, onnx_source: Variant, variants_workdir: Path
) -> None:
    x = random_inputs(2, seed=6)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    output_name = mlp_endpoint.service.variant.model.outputs[0].name
    result = client.infer(
        names(mlp_endpoint)[0], [inp], outputs=[triton.InferRequestedOutput(output_name, class_count=2)]
    )
    got = result.as_numpy(output_name)
    assert got.shape == (2, 2)
    expected = np.argsort(-in_process(onnx_source, variants_workdir, x), axis=1)[:, :2]
    assert [[int(item.decode().split(":")[1]) for item in row] for row in got] == expected.tolist()


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda: triton.InferInput("input", [1, 15], "FP32"), 422, "expected shape (n, 16)"),
        (lambda: triton.InferInput("input", [1, 16], "FP64"), 422, "expected datatype FP32"),
        (lambda: triton.InferInput("nope", [1, 16], "FP32"), 422, "the model's input is 'input'"),
    ],
    ids=["shape", "datatype", "name"],
)
def test_client_mistakes_are_4xx_naming_what_was_expected(
    client: triton.InferenceServerClient, mlp_endpoint: Endpoint, make: object, status: int, words: str
) -> None:
    inp = make()  # type: ignore[operator]
    dtype = {"FP32": np.float32, "FP64": np.float64}[inp.datatype()]
    inp.set_data_from_numpy(np.zeros(inp.shape(), dtype=dtype))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(names(mlp_endpoint)[0], [inp])
    assert caught.value.status() == str(status)
    assert words in caught.value.message()


def test_unknown_model_and_version_are_404(mlp_endpoint: Endpoint) -> None:
    model, _ = names(mlp_endpoint)
    for path in ("/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{model}/versions/v9"):
        response = httpx.get(mlp_endpoint.url + path, timeout=10)
        assert response.status_code == 404, path
        assert model in response.json()["error"]
