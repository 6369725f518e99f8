"""`optiserve build`: real Bentos in a private BentoML home, served from the store by `bentoml serve`."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from optiserve.procs import free_port, spawn, stop_group
from tests.conftest import MLP_CALLABLE, cli_env, error_lines, random_inputs, run_cli, torch_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, Path, subprocess.CompletedProcess[str]]]:
    root = tmp_path_factory.mktemp("bento")
    home = root / "bentoml"
    patch = pytest.MonkeyPatch()
    patch.setenv("BENTOML_HOME", str(home))
    try:
        optimized = run_cli("optimize", "-m", MLP_CALLABLE, "--input-shape", "16", "-w", "w", cwd=root)
        assert optimized.returncode == 0, optimized.stderr
        result = run_cli("build", "-m", MLP_CALLABLE, "--input-shape", "16", "-w", "w", cwd=root)
        yield root, home, result
    finally:
        patch.undo()


def test_build_makes_one_bento_per_variant_and_runtime(
    built: tuple[Path, Path, subprocess.CompletedProcess[str]],
) -> None:
    _, home, result = built
    assert result.returncode == 0, result.stderr
    bentos = sorted(
        p.parent.name + ":" + p.name
        for p in (home / "bentos").glob("*/*")
        if p.is_dir() and p.name != "latest"
    )
    assert [b.split(":")[1] for b in bentos] == ["onnxruntime", "torch-eager"]
    for tag in bentos:
        assert tag in result.stdout
        name, version = tag.split(":")
        bento = home / "bentos" / name / version
        meta = yaml.safe_load((bento / "bento.yaml").read_text())
        assert meta["labels"]["variant"] == name and meta["labels"]["runtime"] == version
        requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
        assert any(r.startswith("bentoml==") for r in requirements)
        assert all("==" in r for r in requirements if r and not r.startswith("-"))
        assert (bento / "env" / "docker" / "Dockerfile").is_file()
        assert (bento / "src" / "model" / "service.json").is_file()
        assert (bento / "src" / "model" / name / "variant.json").is_file()
        assert list((bento / "env" / "python" / "wheels").glob("optiserve-*.whl"))
    onnx = next(b for b in bentos if b.endswith(":onnxruntime"))
    pins = (home / "bentos" / onnx.replace(":", "/") / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime==" in pins and "torch==" not in pins  # only what that runtime needs


def test_a_built_bento_serves_the_open_inference_protocol(
    built: tuple[Path, Path, subprocess.CompletedProcess[str]],
) -> None:
    root, home, _ = built
    (bento,) = [p for p in (home / "bentos").glob("*/onnxruntime")]
    tag = f"{bento.parent.name}:onnxruntime"
    port = free_port()
    env = dict(cli_env(), BENTOML_HOME=str(home))
    env.pop("OPTISERVE_SERVICE_SPEC", None)
    proc = spawn(
        [sys.executable, "-m", "bentoml", "serve", tag, "--port", str(port)],
        log=root / "serve.log",
        env=env,
        cwd=root,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (root / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        x = random_inputs(2, seed=4)
        body = {
            "inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        response = httpx.post(f"{url}/v2/models/mlp/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        out = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
        np.testing.assert_allclose(out, torch_reference(x), atol=1e-5, rtol=1e-5)
    finally:
        stop_group(proc)


def test_containerize_without_an_engine_stops_with_one_line(
    built: tuple[Path, Path, subprocess.CompletedProcess[str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A PATH without docker (the interpreter is named by its full path): one line, exit 5, no Bento."""
    root, _, _ = built
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    result = run_cli(
        "build", "-m", MLP_CALLABLE, "--input-shape", "16", "-w", "w", "--containerize", cwd=root
    )
    assert result.returncode == 5, result.stderr
    (line,) = error_lines(result.stderr)
    assert "no usable container engine: docker is not installed" in line and "make system-deps" in line
    assert not (tmp_path / "home" / "bentos").exists(), "a Bento was built before the engine was checked"
