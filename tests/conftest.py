"""Shared fixtures: a tiny MLP (as a torch callable and as a hand-built ONNX file), its source variants,
a real `bentoml serve` process for the ONNX variant, and helpers to run the CLI and find processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import psutil
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from optiserve.deploy.targets.local import LocalTarget
from optiserve.manifest import variant_dir
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.base import Optimizer
from optiserve.optimizers.source import materialize_source
from optiserve.procs import free_port, spawn, stop_group
from optiserve.types import Endpoint, ServiceSpec, Variant
from tests.tiny_models import N_IN, mlp

REPO_ROOT = Path(__file__).resolve().parents[1]
MLP_CALLABLE = "tests.tiny_models:mlp"


# --- the CLI ------------------------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    """The environment for CLI subprocesses: the repo root on PYTHONPATH so `tests.tiny_models` imports."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, BENTOML_DO_NOT_TRACK="true")


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "optiserve.cli", *map(str, args)]


def run_cli(*args: object, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``optiserve ARGS`` as a real subprocess and return what it did."""
    return subprocess.run(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- processes ------------------------------------------------------------------------------------------


def processes_mentioning(*needles: str) -> list[psutil.Process]:
    """Live processes (not this one) whose command line, cwd or OPTISERVE_* environment contains a needle.

    The cwd and environment matter: BentoML's workers are started without the port or the workdir on
    their command line, but they run in the service's folder with ``OPTISERVE_SERVICE_SPEC`` set.
    """
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            env = {}
        text += " " + " ".join(v for k, v in env.items() if k.startswith("OPTISERVE_"))
        if any(needle in text for needle in needles):
            found.append(proc)
    return found


def service_needles(workdir: Path, port: int) -> tuple[str, ...]:
    """What identifies the servers and load generators of one workdir/port."""
    return (str(workdir.resolve()), f"--port {port}", f"127.0.0.1:{port}")


def wait_until_gone(needles: tuple[str, ...], timeout: float = 10.0) -> list[psutil.Process]:
    """Processes still matching after ``timeout`` seconds (an exiting process may take a moment)."""
    deadline = time.monotonic() + timeout
    left = processes_mentioning(*needles)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_mentioning(*needles)
    return left


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(f"{p.pid}: {' '.join(p.cmdline())}")
        except psutil.Error:
            lines.append(f"{p.pid}: (gone)")
    return "\n".join(lines)


# --- the tiny model -----------------------------------------------------------------------------------


def torch_reference(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return mlp()(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


def random_inputs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, N_IN)).astype(np.float32)


def write_mlp_onnx(path: Path) -> Path:
    """The weights of ``mlp()`` as a hand-built ONNX graph (Gemm → Relu → Gemm), batch axis dynamic.

    Built with onnx.helper rather than an exporter, so the fixture does not depend on the code under test.
    """
    first, _, second = mlp()
    weights = [
        numpy_helper.from_array(t.detach().numpy(), name)
        for t, name in (
            (first.weight, "w1"),
            (first.bias, "b1"),
            (second.weight, "w2"),
            (second.bias, "b2"),
        )
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", N_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", second.out_features])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mlp_onnx(tmp_path_factory.mktemp("model") / "mlp.onnx")


@pytest.fixture(scope="session")
def variants_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workdir for the session's shared variants (tests that modify a variant copy it first)."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def onnx_source(mlp_onnx: Path, variants_workdir: Path) -> Variant:
    """The source variant of the ONNX file."""
    return materialize_source(resolve_model(str(mlp_onnx)), variants_workdir)


@pytest.fixture(scope="session")
def torch_source(variants_workdir: Path) -> Variant:
    """The source variant of the torch callable ``tests.tiny_models:mlp``."""
    return materialize_source(resolve_model(MLP_CALLABLE, input_shape=(N_IN,)), variants_workdir)


@pytest.fixture(scope="session")
def variants_by_format(onnx_source: Variant, torch_source: Variant) -> dict[str, Variant]:
    """A variant of the same weights in each artifact format the tiny model has."""
    return {"onnx": onnx_source, "torch": torch_source}


def parent_for(optimizer: Optimizer, pool: dict[str, Variant], workdir: Path) -> Variant:
    """A variant of the tiny model that ``optimizer`` accepts, made by a chain of optimizers if needed.

    ``pool`` maps artifact formats to fp32 variants and grows as chains are built, so an optimizer
    that works on, say, OpenVINO IR gets its parent from whichever optimizer writes IR.
    """
    direct = [v for v in pool.values() if optimizer.accepts(v)]
    if direct:
        return direct[0]
    for fmt in optimizer.input_formats:
        made = variant_in_format(fmt, pool, workdir)
        if made is not None and optimizer.accepts(made):
            return made
    raise AssertionError(
        f"no chain of optimizers gives {optimizer.name} a parent in {optimizer.input_formats}"
    )


def variant_in_format(fmt: str, pool: dict[str, Variant], workdir: Path, depth: int = 3) -> Variant | None:
    """An fp32 variant in ``fmt``, from the pool or built by the first lossless optimizer that writes it."""
    if fmt in pool:
        return pool[fmt]
    if depth == 0:
        return None
    for cls in Optimizer.registry().values():
        if cls.output_format != fmt or cls.lossy or not cls.availability().ok:
            continue
        optimizer = cls()
        for parent_fmt in cls.input_formats:
            parent = variant_in_format(parent_fmt, pool, workdir, depth - 1)
            if parent is not None and optimizer.accepts(parent):
                child = optimizer.apply(parent, workdir)
                if child.precision == "fp32":
                    pool[fmt] = child
                    return child
    return None


# --- a real server --------------------------------------------------------------------------------------


def service_spec(variant: Variant, workdir: Path, runtime: str) -> ServiceSpec:
    return ServiceSpec(
        variant=variant, variant_dir=str(variant_dir(workdir, variant.id).resolve()), runtime=runtime
    )


@pytest.fixture(scope="session")
def mlp_endpoint(onnx_source: Variant, variants_workdir: Path) -> Iterator[Endpoint]:
    """A real `bentoml serve` process for the ONNX MLP on onnxruntime, for the whole session."""
    with LocalTarget(variants_workdir, ready_timeout_s=120) as deployment:
        yield deployment.start(service_spec(onnx_source, variants_workdir, "onnxruntime"))


@contextlib.contextmanager
def null_server(
    variant: Variant,
    workdir: Path,
    log: Path,
    *,
    cpus: frozenset[int] | None,
    stall: tuple[float, float] | None = None,
) -> Iterator[Endpoint]:
    """optiserve.loadtests.null_server (answers at once, or stalls as asked) posing as ``variant`` served:
    what the load generator's own limits are measured against."""
    port = free_port()
    args = [sys.executable, "-m", "optiserve.loadtests.null_server", str(port)]
    if stall:
        args += [str(stall[0]), str(stall[1])]
    proc = spawn(args, log=log, cpus=cpus)
    deadline = time.monotonic() + 10
    while b"ready" not in (log.read_bytes() if log.exists() else b"") and time.monotonic() < deadline:
        time.sleep(0.05)
    spec = service_spec(variant, workdir, "onnxruntime").model_copy(update={"port": port})
    try:
        yield Endpoint(service=spec, url=f"http://127.0.0.1:{port}")
    finally:
        stop_group(proc, grace_s=2)


@contextlib.contextmanager
def serve_cli(*args: object, cwd: Path) -> Iterator[list[str]]:
    """`optiserve serve ARGS` running, once its table says every server is up (yields what it printed
    until then); stopped after."""
    proc = subprocess.Popen(
        cli_command("serve", *args),
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        printed = []
        for line in proc.stdout:  # type: ignore[union-attr]
            printed.append(line)
            if "intra-op" in line:  # the table: every server is up
                break
        yield printed
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


# --- reliability figures ----------------------------------------------------------------------------------

RELIABILITY_FIGURES: list[tuple[str, str, str]] = []
"""(test, figure, value) recorded by the fuzzing, overload and fault tests; printed after the run."""


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    """``figures(name, value)``: one reliability figure, shown in the session's summary (`make selftest`)."""

    def record(name: str, value: object) -> None:
        RELIABILITY_FIGURES.append((request.node.name, name, str(value)))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RELIABILITY_FIGURES:
        return
    terminalreporter.section("reliability figures")
    for test, name, value in RELIABILITY_FIGURES:
        terminalreporter.write_line(f"{name:<44} {value:<28} ({test})")


# --- replicas --------------------------------------------------------------------------------------------


def assert_connections_spread(endpoint: Endpoint, workers: list[psutil.Process]) -> None:
    """16 connections, 40 requests each: every worker does a share of the work, and the one /metrics
    counts all of it. (16 connections hashed over 2 listening sockets all land on one with
    probability 2 / 2**16.)"""
    before = {w.pid: sum(w.cpu_times()[:2]) for w in workers}

    async def one() -> None:
        async with httpx.AsyncClient(timeout=30) as client:  # a connection of its own
            for _ in range(40):
                r = await client.post(endpoint.predict_url, json={"inputs": random_inputs(4).tolist()})
                assert r.status_code == 200

    async def users() -> None:
        await asyncio.gather(*(one() for _ in range(16)))

    asyncio.run(users())
    used = {w.pid: sum(w.cpu_times()[:2]) - before[w.pid] for w in workers}
    assert min(used.values()) > 0.15 * sum(used.values()), f"CPU seconds by worker: {used}"
    text = httpx.get(f"{endpoint.url}/metrics", timeout=10).text
    served = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("optiserve_requests_total{") and 'code="200"' in line
    )
    assert served >= 16 * 40
