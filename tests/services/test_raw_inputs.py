"""What users send (JPEG/PNG photos, text) to real servers of the built-in models, preprocessed inside
the service: the answers equal the in-process model's on the same bytes."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from optiserve.deploy.targets.local import LocalTarget
from optiserve.models.base import BuiltinModel
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.source import materialize_source
from optiserve.types import Endpoint
from tests.conftest import service_spec

pytestmark = pytest.mark.slow


def photo(name: str, fmt: str) -> bytes:
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Endpoint]]:
    """efficientnet-lite0 and minilm-l6 on torch-eager (no export needed), one server each."""
    work = tmp_path_factory.mktemp("raw")
    with LocalTarget(work, ready_timeout_s=300) as deployment:
        out = {}
        for name in ("efficientnet-lite0", "minilm-l6"):
            variant = materialize_source(resolve_model(name), work)
            out[name] = deployment.start(service_spec(variant, work, "torch-eager"))
        yield out


def reference(model: str, items: list[bytes]) -> np.ndarray:
    cls = BuiltinModel.get(model)
    with torch.inference_mode():
        return cls.build()(torch.from_numpy(cls.from_raw(items))).numpy()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "fmt"), [("chelsea", "JPEG"), ("coffee", "PNG")])
def test_classify_an_image_body(served: dict[str, Endpoint], name: str, fmt: str) -> None:
    endpoint = served["efficientnet-lite0"]
    body = photo(name, fmt)
    response = httpx.post(
        f"{endpoint.url}/classify", content=body, headers={"content-type": f"image/{fmt.lower()}"}, timeout=60
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 5
    expected = reference("efficientnet-lite0", [body])[0]
    assert predictions[0]["index"] == int(expected.argmax())
    assert predictions[0]["label"] == BuiltinModel.get("efficientnet-lite0").labels()[int(expected.argmax())]  # type: ignore[index]


def test_images_as_an_oip_bytes_tensor(served: dict[str, Endpoint]) -> None:
    endpoint = served["efficientnet-lite0"]
    bodies = [photo("chelsea", "JPEG"), photo("astronaut", "PNG")]
    client = triton.InferenceServerClient(endpoint.url.removeprefix("http://"))
    inp = triton.InferInput("input", [2], "BYTES")
    inp.set_data_from_numpy(np.array(bodies, dtype=np.object_))
    result = client.infer("efficientnet-lite0", [inp])
    np.testing.assert_allclose(result.as_numpy("logits"), reference("efficientnet-lite0", bodies), atol=1e-3)


def test_text_to_embedding(served: dict[str, Endpoint]) -> None:
    endpoint = served["minilm-l6"]
    texts = ["A cat sits on the mat.", "Serving models on Kubernetes, with numbers you can trust."]
    response = httpx.post(
        f"{endpoint.url}/embed", content=texts[0].encode(), headers={"content-type": "text/plain"}, timeout=60
    )
    assert response.status_code == 200, response.text
    vector = np.asarray(response.json()["embedding"])
    expected = reference("minilm-l6", [t.encode() for t in texts])
    assert vector.shape == (384,)
    np.testing.assert_allclose(vector, expected[0], atol=1e-4)
    # Texts of different lengths in one OIP request: padded inside the service, results unchanged.
    client = triton.InferenceServerClient(endpoint.url.removeprefix("http://"))
    inp = triton.InferInput("input_ids", [2], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    got = client.infer("minilm-l6", [inp]).as_numpy("sentence_embedding")
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("model", "path", "body", "content_type", "status", "words"),
    [
        ("efficientnet-lite0", "/classify", b"GIF89a-not-really", "image/jpeg", 415, "expected JPEG or PNG"),
        ("efficientnet-lite0", "/classify", b"", "text/plain", 415, "expected image/jpeg or image/png"),
        ("efficientnet-lite0", "/embed", b"hi", "text/plain", 415, "does not embed text"),
        ("minilm-l6", "/embed", b"\xff\xfe\xfa", "text/plain", 415, "expected UTF-8 text"),
        ("minilm-l6", "/classify", b"x", "image/png", 415, "does not classify images"),
    ],
)
def test_bad_raw_inputs_are_4xx(
    served: dict[str, Endpoint],
    model: str,
    path: str,
    body: bytes,
    content_type: str,
    status: int,
    words: str,
) -> None:
    response = httpx.post(
        served[model].url + path, content=body, headers={"content-type": content_type}, timeout=30
    )
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_token_ids_outside_the_vocabulary_are_422(served: dict[str, Endpoint]) -> None:
    endpoint = served["minilm-l6"]
    response = httpx.post(endpoint.predict_url, json={"inputs": [[101, 99999, 102]]}, timeout=30)
    assert response.status_code == 422
    assert "values must lie in [0, 30521]" in response.text
