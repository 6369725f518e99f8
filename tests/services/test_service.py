"""The BentoML service, started for real by LocalTarget, answering HTTP."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from optiserve.deploy.targets.local import LocalTarget
from optiserve.errors import ServingError
from optiserve.manifest import variant_dir
from optiserve.types import Endpoint, Variant
from tests.conftest import (
    describe,
    processes_mentioning,
    random_inputs,
    service_needles,
    service_spec,
    wait_until_gone,
)

pytestmark = pytest.mark.slow


def in_process(variant: Variant, workdir: Path, x: np.ndarray) -> np.ndarray:
    path = variant_dir(workdir, variant.id) / variant.artifacts["model"].path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]  # type: ignore[no-any-return]


def test_readyz_answers_200(mlp_endpoint: Endpoint) -> None:
    assert httpx.get(f"{mlp_endpoint.url}/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize("batch", [1, 3])
def test_predict_matches_in_process_onnxruntime(
    mlp_endpoint: Endpoint, onnx_source: Variant, variants_workdir: Path, batch: int
) -> None:
    x = random_inputs(batch, seed=21)
    response = httpx.post(mlp_endpoint.predict_url, json={"inputs": x.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    got = np.asarray(response.json(), dtype=np.float32)
    np.testing.assert_allclose(got, in_process(onnx_source, variants_workdir, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inputs", [[[0.5] * 15], [[[0.5] * 16]]], ids=["15-features", "3-d"])
def test_wrong_shape_is_422_naming_the_expected_shape(mlp_endpoint: Endpoint, inputs: list[object]) -> None:
    response = httpx.post(mlp_endpoint.predict_url, json={"inputs": inputs}, timeout=30)
    assert response.status_code == 422
    assert "expected shape (n, 16)" in response.text


@pytest.mark.parametrize("body", [{"inputs": [["a"] * 16]}, {"inputs": "x"}, {"input": [[0.5] * 16]}])
def test_bad_body_is_400(mlp_endpoint: Endpoint, body: dict[str, object]) -> None:
    response = httpx.post(mlp_endpoint.predict_url, json=body, timeout=30)
    assert response.status_code == 400, response.text


def test_the_server_still_answers_after_bad_requests(mlp_endpoint: Endpoint) -> None:
    httpx.post(mlp_endpoint.predict_url, json={"inputs": [[0.5] * 15]}, timeout=30)
    response = httpx.post(mlp_endpoint.predict_url, json={"inputs": [[0.5] * 16]}, timeout=30)
    assert response.status_code == 200


def test_leaving_the_with_block_stops_every_server_process(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"  # the server's own folder (service.json, server.log) goes here
    with LocalTarget(workdir, ready_timeout_s=120) as deployment:
        endpoint = deployment.start(service_spec(onnx_source, variants_workdir, "onnxruntime"))
        needles = service_needles(workdir, endpoint.service.port or 0)
        running = processes_mentioning(*needles)
        assert len(running) >= 2, f"expected the server and its worker:\n{describe(running)}"
        assert httpx.get(f"{endpoint.url}/readyz", timeout=10).status_code == 200
    left = wait_until_gone(needles, timeout=5)
    assert not left, f"still running after the with block:\n{describe(left)}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{endpoint.url}/readyz", timeout=5)


def test_a_variant_modified_after_optimizing_fails_fast_with_a_serving_error(
    onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    """The service re-checks the checksum; a worker that cannot initialise must not be waited on."""
    copy = tmp_path / "variants" / onnx_source.id
    shutil.copytree(variant_dir(variants_workdir, onnx_source.id), copy)
    with (copy / onnx_source.artifacts["model"].path).open("ab") as fh:
        fh.write(b"\0")
    workdir = tmp_path / "work"
    started = time.monotonic()
    with (
        LocalTarget(workdir, ready_timeout_s=120) as deployment,
        pytest.raises(ServingError, match="sha256"),
    ):
        deployment.start(service_spec(onnx_source, tmp_path, "onnxruntime"))
    assert time.monotonic() - started < 60
    assert not wait_until_gone((str(workdir.resolve()),), timeout=5)
