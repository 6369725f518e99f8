"""`optiserve bench --url`: load-testing an Open Inference Protocol server we did not start.

The foreign server here is written for the test with the standard library only: plain JSON (no binary
tensor extension), no Prometheus metrics, its own name in ``GET /v2``; our own served variant stands for
a server that speaks optiserve's metrics contract.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optiserve.types import Endpoint
from tests.conftest import error_lines, run_cli
from tests.tiny_models import N_IN

pytestmark = pytest.mark.slow

MODEL = "tiny"


class ForeignOIP(BaseHTTPRequestHandler):
    """A minimal OIP v2 server: y = sum(x) per sample, JSON only."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        routes = {
            "/v2": {"name": "tiny-foreign", "version": "0.0.1", "extensions": []},
            "/v2/health/live": {"live": True},
            "/v2/health/ready": {"ready": True},
            f"/v2/models/{MODEL}/ready": {"ready": True},
            f"/v2/models/{MODEL}": {
                "name": MODEL,
                "platform": "numpy",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, N_IN]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
            },
        }
        if self.path in routes:
            self._send(200, routes[self.path])
        else:
            self._send(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != f"/v2/models/{MODEL}/infer" or "Inference-Header-Content-Length" in self.headers:
            self._send(400, {"error": "JSON requests only"})
            return
        tensor = json.loads(body)["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        y = x.sum(axis=1, keepdims=True)
        self._send(
            200,
            {
                "model_name": MODEL,
                "outputs": [
                    {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}
                ],
            },
        )


@pytest.fixture(scope="module")
def foreign_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ForeignOIP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def latest_run(work: Path) -> Path:
    return sorted((work / "results").iterdir())[-1]


def test_a_foreign_json_only_server_gets_a_client_side_report(foreign_url: str, tmp_path: Path) -> None:
    work = tmp_path / "w"
    done = run_cli(
        "bench", "--url", foreign_url, "--model-name", MODEL, "-w", work,
        "-c", "1,2", "--duration", "2", "--warmup", "0.5", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run = latest_run(work)
    report = json.loads((run / "report.json").read_text())
    rows = report["report"]["rows"] if "report" in report else report["rows"]
    (row,) = rows
    assert row["runtime"] == "tiny-foreign"  # the server's own name, from GET /v2
    assert [r["load"]["encoding"] for r in row["results"]] == ["json", "json"]  # binary was refused
    assert all(r["n_requests"] > 0 and r["n_errors"] == 0 for r in row["results"])
    assert all(r["server"] is None and r["endpoint"]["target"] == "url" for r in row["results"])
    assert "client-side only" in (run / "measurement.txt").read_text()
    md = (run / "report.md").read_text()
    assert "JSON tensors" in md and "a server named by URL" in md


def test_our_own_server_by_url_is_measured_server_side(mlp_endpoint: Endpoint, tmp_path: Path) -> None:
    work = tmp_path / "w"
    model = mlp_endpoint.service.variant.model.name
    done = run_cli(
        "bench", "--url", mlp_endpoint.url, "--model-name", model, "-w", work,
        "-c", "1", "--duration", "2", "--warmup", "0.5", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((latest_run(work) / "report.json").read_text())
    rows = report["report"]["rows"] if "report" in report else report["rows"]
    (row,) = rows
    assert row["variant_id"] == mlp_endpoint.service.variant.id  # named by the server's metadata
    assert row["runtime"] == "onnxruntime"
    (result,) = row["results"]
    assert result["load"]["encoding"] == "binary"
    assert result["server"] is not None and result["server"]["requests"] > 0


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("--url", "http://127.0.0.1:9"), 2, "--url needs --model-name"),
        (
            ("--url", "http://127.0.0.1:9", "--model-name", "m", "--replicas", "2"),
            2,
            "--replicas does not apply to --url",
        ),
        (
            ("--url", "http://127.0.0.1:9", "--model-name", "m"),
            7,
            "no Open Inference Protocol server answers",
        ),
    ],
)
def test_bad_url_input_is_one_line(args: tuple[str, ...], code: int, words: str, tmp_path: Path) -> None:
    done = run_cli("bench", *args, "-w", tmp_path / "w", cwd=tmp_path)
    assert done.returncode == code, done.stderr
    (line,) = error_lines(done.stderr)
    assert words in line
    assert not (tmp_path / "w" / "results").exists(), "a failed start wrote a results folder"


def test_a_model_the_server_does_not_serve_is_one_line(foreign_url: str, tmp_path: Path) -> None:
    done = run_cli("bench", "--url", foreign_url, "--model-name", "nope", "-w", tmp_path / "w", cwd=tmp_path)
    assert done.returncode == 7, done.stderr
    (line,) = error_lines(done.stderr)
    assert "/v2/models/nope/ready answered HTTP 404" in line
