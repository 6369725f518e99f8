"""The docker target against a real engine: the image `optiserve build --containerize` makes, run with
the chart's pod settings, serving, load-tested, draining and refusing a corrupted artifact.

Needs a docker daemon and (for the base image) debootstrap as root: `make system-deps` provides both.
Without them the tests skip with the reason, except in CI, where a missing engine fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from optiserve.deploy.bento import build_bento, build_wheel
from optiserve.deploy.engine import docker, engine_problem
from optiserve.deploy.images import build_image
from optiserve.deploy.targets.base import ready_workers
from optiserve.deploy.targets.docker import MANAGED_LABEL, DockerTarget
from optiserve.errors import ServingError
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.source import materialize_source
from optiserve.services.oip_codec import encode_request
from optiserve.types import Endpoint, ServiceSpec, Variant
from tests.conftest import assert_connections_spread, error_lines, random_inputs, run_cli, service_spec
from tests.deploy.conftest import unavailable

pytestmark = pytest.mark.slow

SLOW_WIDTH = 512
SLOW_ROWS = 1024
SLOW_LAYERS = 50
"""The slow model's size: ~5 GFLOP a sample, a few hundred ms on one core (for the drain test)."""


@pytest.fixture(scope="session")
def engine() -> None:
    problem = engine_problem()
    if problem:
        unavailable(f"no container engine: {problem}")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def image_for(spec: ServiceSpec, wheel: Path, log: Path) -> str:
    return build_image(build_bento(spec, wheel), wheel, log).tag


@pytest.fixture(scope="session")
def mlp_image(engine: None, onnx_source: Variant, variants_workdir: Path, wheel: Path) -> str:
    return image_for(
        service_spec(onnx_source, variants_workdir, "onnxruntime"), wheel, variants_workdir / "b.log"
    )


@pytest.fixture
def mlp_container(
    mlp_image: str, onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> Iterator[tuple[DockerTarget, Endpoint]]:
    with DockerTarget(tmp_path, ready_timeout_s=180) as target:
        yield target, target.start(service_spec(onnx_source, variants_workdir, "onnxruntime"))


def exec_in(container: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", container, *cmd], capture_output=True, text=True, timeout=60)


def managed_containers() -> list[str]:
    done = subprocess.run(
        ["docker", "ps", "--all", "--quiet", "--filter", f"label={MANAGED_LABEL}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.split()


# --- the image --------------------------------------------------------------------------------------------


def test_onnxruntime_image_is_small_and_has_no_torch(mlp_image: str) -> None:
    size = int(subprocess.check_output(["docker", "image", "inspect", "--format", "{{.Size}}", mlp_image]))
    assert size < 1e9, f"{mlp_image} is {size / 1e6:.0f} MB"
    probe = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python", mlp_image, "-c", "import onnxruntime, torch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe.stderr


def test_build_containerize_prints_each_image_and_its_size(
    engine: None, mlp_onnx: Path, tmp_path: Path
) -> None:
    done = run_cli("optimize", "-m", mlp_onnx, "-w", tmp_path / "w", "--no-eval", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = run_cli(
        "build", "-m", mlp_onnx, "-w", tmp_path / "w", "-r", "onnxruntime", "--containerize", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert ":onnxruntime" in done.stdout and " MB" in done.stdout and "built in" in done.stdout


# --- the container, as the chart's pod ------------------------------------------------------------------


def test_container_runs_as_the_pod_spec_says(mlp_container: tuple[DockerTarget, Endpoint]) -> None:
    target, endpoint = mlp_container
    name = target.container(endpoint)
    assert exec_in(name, "id", "-u").stdout.strip() == "1034"
    assert exec_in(name, "id", "-g").stdout.strip() == "1034"
    write = exec_in(name, "sh", "-c", "echo x > /opt/x")
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    status = exec_in(name, "cat", "/proc/1/status").stdout
    assert re_field(status, "CapEff") == "0000000000000000", "capabilities were not all dropped"
    assert re_field(status, "NoNewPrivs") == "1"
    assert re_field(status, "Seccomp") == "2", "no seccomp filter (RuntimeDefault)"
    mounts = exec_in(name, "cat", "/proc/mounts").stdout
    assert any(line.split()[1] == "/tmp" and line.split()[2] == "tmpfs" for line in mounts.splitlines())
    limits = json.loads(
        subprocess.check_output(["docker", "inspect", "--format", "{{json .HostConfig}}", name])
    )
    assert limits["NanoCpus"] == 1_500_000_000  # the chart's 1500m: 1 thread + 0.5 core
    assert limits["Memory"] > 0 and limits["ReadonlyRootfs"] is True
    assert httpx.get(f"{endpoint.url}/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{endpoint.url}/v2/health/ready", timeout=10).status_code == 200


def test_replicas_are_workers_of_one_container_each_on_its_cpu(
    mlp_image: str, onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    cpus = frozenset(sorted(os.sched_getaffinity(0))[:2])
    spec = service_spec(onnx_source, variants_workdir, "onnxruntime").model_copy(update={"replicas": 2})
    with DockerTarget(tmp_path, ready_timeout_s=180) as target:
        endpoint = target.start(spec, cpus=cpus)
        name = target.container(endpoint)
        assert ready_workers(httpx.get(f"{endpoint.url}/metrics", timeout=10).text) == 2
        limits = json.loads(
            subprocess.check_output(["docker", "inspect", "--format", "{{json .HostConfig}}", name])
        )
        # the pod's CPU for two workers, 2 × (1 + 0.5), as far as the machine has it
        assert limits["NanoCpus"] == int(min(3.0, os.cpu_count() or 1) * 1e9)
        top = subprocess.check_output(["docker", "top", name, "-eo", "pid,args"], text=True).splitlines()[1:]
        workers = [psutil.Process(int(line.split()[0])) for line in top if "--worker-id" in line]
        assert sorted(tuple(w.cpu_affinity()) for w in workers) == [(min(cpus),), (max(cpus),)]
        assert_connections_spread(endpoint, workers)


def re_field(status: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith(f"{key}:"))


def test_oip_inference_equals_the_in_process_model(
    mlp_container: tuple[DockerTarget, Endpoint], mlp_onnx: Path
) -> None:
    _, endpoint = mlp_container
    x = random_inputs(3, seed=7)
    expected = ort.InferenceSession(str(mlp_onnx)).run(None, {"input": x})[0]
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    answer = httpx.post(endpoint.infer_url, json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    out = answer.json()["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_load_test_against_containers_writes_the_same_report_as_local(
    engine: None, mlp_image: str, onnx_source: Variant, variants_workdir: Path, mlp_onnx: Path, tmp_path: Path
) -> None:
    work = tmp_path / "w"
    shutil.copytree(variants_workdir / "variants" / onnx_source.id, work / "variants" / onnx_source.id)
    reports = {}
    for target in ("local", "docker"):
        done = run_cli(
            "bench", "-m", mlp_onnx, "-w", work, "-r", "onnxruntime", "--target", target,
            "-c", "1,2", "--duration", "2", "--warmup", "0.5", cwd=tmp_path, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        run_dir = sorted((work / "results").iterdir())[-1]
        reports[target] = json.loads((run_dir / "report.json").read_text())
        assert {p.name for p in run_dir.iterdir()} >= {"report.json", "report.md", "report.html", "samples"}
    local, docker = reports["local"], reports["docker"]
    assert local.keys() == docker.keys()
    (row,) = docker["report"]["rows"] if "report" in docker else docker["rows"]
    assert [r["endpoint"]["target"] for r in row["results"]] == ["docker", "docker"]
    assert all(r["n_errors"] == 0 and r["n_requests"] > 0 for r in row["results"])
    assert all(r["server"] is not None for r in row["results"]), "no server-side figures from the container"


# --- drain, corruption, bad input ----------------------------------------------------------------------


def write_slow_onnx(path: Path) -> Path:
    """(n, 16) → (n, 4) through SLOW_LAYERS matmuls on a (n, SLOW_ROWS, SLOW_WIDTH) activation."""
    rng = np.random.default_rng(0)
    w_in = rng.standard_normal((16, SLOW_WIDTH)).astype(np.float32) * 0.1
    w = (np.eye(SLOW_WIDTH) * 0.5).astype(np.float32)
    w_out = rng.standard_normal((SLOW_WIDTH, 4)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["input", "w_in"], ["h0"]),
        helper.make_node("Unsqueeze", ["h0", "axis1"], ["h1"]),
        helper.make_node("Expand", ["h1", "rows"], ["a0"]),
    ]
    for i in range(SLOW_LAYERS):
        nodes.append(helper.make_node("MatMul", [f"a{i}", "w"], [f"a{i + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"a{SLOW_LAYERS}", "axis1"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "w_out"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(w_in, "w_in"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(w_out, "w_out"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array([1, SLOW_ROWS, SLOW_WIDTH], dtype=np.int64), "rows"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_docker_stop_drains_the_requests_in_flight(engine: None, wheel: Path, tmp_path: Path) -> None:
    variant = materialize_source(resolve_model(str(write_slow_onnx(tmp_path / "slow.onnx"))), tmp_path)
    spec = service_spec(variant, tmp_path, "onnxruntime")
    image_for(spec, wheel, tmp_path / "build.log")
    x = np.zeros((1, 16), dtype=np.float32)
    body, header_length = encode_request("input", x)
    headers = {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    with DockerTarget(tmp_path, ready_timeout_s=300) as target:
        endpoint = target.start(spec)
        started = time.monotonic()
        httpx.post(endpoint.infer_url, content=body, headers=headers, timeout=60)
        one = time.monotonic() - started
        assert one > 0.1, f"the slow model took only {one * 1000:.0f} ms: the drain test would prove nothing"

        async def scenario() -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                requests = [
                    asyncio.create_task(client.post(endpoint.infer_url, content=body, headers=headers))
                    for _ in range(6)
                ]
                await asyncio.sleep(one / 2)  # all in flight: one batch running, the rest queued
                stop = asyncio.create_task(asyncio.to_thread(target.stop, endpoint))
                responses = await asyncio.gather(*requests, return_exceptions=True)
                await stop
            return [r.status_code if isinstance(r, httpx.Response) else -1 for r in responses]

        statuses = asyncio.run(scenario())
    assert statuses == [200] * 6, statuses


def test_corrupted_artifact_in_the_image_refuses_to_start(
    engine: None, mlp_onnx: Path, wheel: Path, tmp_path: Path
) -> None:
    # its own variant (another name, so another id and image): the shared image stays intact
    variant = materialize_source(resolve_model(str(mlp_onnx), name="mlp-corrupt"), tmp_path)
    spec = service_spec(variant, tmp_path, "onnxruntime")
    image = image_for(spec, wheel, tmp_path / "build.log")
    artifact = f"/home/bentoml/bento/src/model/{variant.id}/{variant.artifacts['model'].path}"
    scratch = f"optiserve-corrupt-{int(time.time())}"
    corrupted = tmp_path / "model.onnx"
    subprocess.run(["docker", "create", "--name", scratch, image], check=True, capture_output=True)
    try:
        subprocess.run(
            ["docker", "cp", f"{scratch}:{artifact}", str(corrupted)], check=True, capture_output=True
        )
        data = bytearray(corrupted.read_bytes())
        data[-1] ^= 0xFF
        corrupted.write_bytes(bytes(data))
        subprocess.run(
            ["docker", "cp", str(corrupted), f"{scratch}:{artifact}"], check=True, capture_output=True
        )
        subprocess.run(["docker", "commit", scratch, image], check=True, capture_output=True)
    finally:
        subprocess.run(["docker", "rm", "--force", scratch], capture_output=True)
    with DockerTarget(tmp_path, ready_timeout_s=120) as target, pytest.raises(ServingError) as err:
        target.start(spec)
    assert "sha256" in str(err.value), str(err.value)  # the checksum error, from the container's log
    assert not managed_containers(), "a failed start left a container behind"


def test_a_command_line_docker_refuses_is_reported_with_docker_s_reason(mlp_image: str) -> None:
    # docker's last line is only "See 'docker run --help'."; the reason is the line above it
    with pytest.raises(ServingError) as e:
        docker(["run", "--rm", "--cpus", "9999", mlp_image, "true"], what="docker run")
    assert "--help" not in str(e.value) and "CPU" in str(e.value), str(e.value)


def test_variant_without_an_image_is_one_line(engine: None, mlp_onnx: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    model = shutil.copy(mlp_onnx, tmp_path / "never-built.onnx")  # a variant no image was built for
    assert run_cli("optimize", "-m", model, "-w", work, "--no-eval", cwd=tmp_path).returncode == 0
    done = run_cli(
        "serve",
        "-m",
        model,
        "-w",
        work,
        "-r",
        "onnxruntime",
        "--target",
        "docker",
        "--for",
        "1",
        cwd=tmp_path,
    )
    assert done.returncode == 7, done.stderr
    (line,) = error_lines(done.stderr)
    assert "no image" in line and "optiserve build --containerize" in line
    assert not managed_containers()


def test_port_already_taken_is_one_line(
    engine: None, mlp_image: str, mlp_onnx: Path, onnx_source: Variant, variants_workdir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "w"
    shutil.copytree(variants_workdir / "variants" / onnx_source.id, work / "variants" / onnx_source.id)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run_cli(
            "serve", "-m", mlp_onnx, "-w", work, "-r", "onnxruntime", "--target", "docker",
            "--port", port, "--for", "1", cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 7, done.stderr
    (line,) = error_lines(done.stderr)
    assert f"port {port}" in line and "already in use" in line
    assert not managed_containers()


def test_daemon_that_does_not_answer_is_one_line_exit_5(mlp_onnx: Path, tmp_path: Path) -> None:
    import os

    work = tmp_path / "w"
    assert run_cli("optimize", "-m", mlp_onnx, "-w", work, "--no-eval", cwd=tmp_path).returncode == 0
    env_before = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = f"unix://{tmp_path}/no-daemon.sock"
    try:
        done = run_cli("serve", "-m", mlp_onnx, "-w", work, "--target", "docker", "--for", "1", cwd=tmp_path)
    finally:
        if env_before is None:
            os.environ.pop("DOCKER_HOST")
        else:
            os.environ["DOCKER_HOST"] = env_before
    assert done.returncode == 5, done.stderr
    (line,) = error_lines(done.stderr)
    assert "container engine" in line and "daemon" in line


def test_tune_measures_its_trials_in_containers(
    engine: None, mlp_image: str, onnx_source: Variant, variants_workdir: Path, mlp_onnx: Path, tmp_path: Path
) -> None:
    """`optiserve tune --target docker`: each trial's server is the image's container, run with the trial's
    own batching settings (the chart's pod spec carries them), and the study completes."""
    import yaml

    work = tmp_path / "w"
    shutil.copytree(variants_workdir / "variants" / onnx_source.id, work / "variants" / onnx_source.id)
    config = tmp_path / "tune.yaml"
    tune = {"strategy": "grid", "duration_s": 2, "warmup_s": 0.5, "steps": 1, "min_rate": 10, "remeasure": 0}
    tune["space"] = {"max_batch_size": [4], "max_latency_ms": [1000], "runtimes": ["onnxruntime"]}
    config.write_text(yaml.safe_dump({"model": {"ref": str(mlp_onnx)}, "workdir": str(work), "tune": tune}))
    done = run_cli("tune", config, "--target", "docker", "--slo", 500, cwd=tmp_path, timeout=600)
    assert done.returncode in (0, 9), done.stderr  # 9: measured, but the SLO search did not trust a level
    (out,) = work.glob("results/*-tune")
    (trial,) = json.loads((out / "tune.json").read_text())["trials"]
    assert trial["levels"] >= 1 and trial["params"]["max_batch_size"] == 4
    results = [json.loads(p.read_text()) for p in Path(trial["run_dir"]).glob("bench/*.json")]
    assert results and all(r["endpoint"]["target"] == "docker" for r in results)
    assert all(r["endpoint"]["service"]["batching"]["max_batch_size"] == 4 for r in results)
