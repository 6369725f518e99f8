"""Replicas on one machine (``serving.replicas``): worker processes of one server, each on its own CPUs,
each accepting its own share of the connections, all counted in one /metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import psutil
import pytest

from optiserve.config import replica_cpus
from optiserve.deploy.targets.base import ready_workers
from optiserve.deploy.targets.local import LocalTarget
from optiserve.metrics import forget_dead_workers
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.source import materialize_source
from optiserve.procs import free_port
from optiserve.types import Variant
from tests.conftest import assert_connections_spread, serve_cli, service_spec


@pytest.mark.parametrize(
    ("allowed", "replicas", "shares"),
    [
        ([0, 1], 2, [{0}, {1}]),
        ([4, 5, 6, 7, 8], 2, [{4, 5, 6}, {7, 8}]),
        ([0, 1, 2, 3], 3, [{0, 1}, {2}, {3}]),
        ([3], 2, [None, None]),  # fewer CPUs than replicas: they share
        ([0, 1], 1, [{0, 1}]),
    ],
)
def test_replica_cpus_are_disjoint_shares(
    allowed: list[int], replicas: int, shares: list[set[int] | None]
) -> None:
    got = [replica_cpus(allowed, replicas, i) for i in range(replicas)]
    assert [None if g is None else set(g) for g in got] == shares


def test_a_dead_worker_s_live_gauges_are_forgotten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = psutil.Popen(["true"])
    dead.wait()
    for pid in (os.getpid(), dead.pid):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
    (tmp_path / f"counter_{dead.pid}.db").write_bytes(b"")  # counters of dead workers still count
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    forget_dead_workers()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"gauge_livesum_{os.getpid()}.db", f"counter_{dead.pid}.db"]
    )


@pytest.mark.slow
def test_two_replicas_take_a_cpu_and_connections_each(onnx_source: Variant, variants_workdir: Path) -> None:
    cpus = frozenset(sorted(os.sched_getaffinity(0))[:2])
    if len(cpus) < 2:
        pytest.fail("this test needs 2 CPUs (every machine this project supports has them)")
    spec = service_spec(onnx_source, variants_workdir, "onnxruntime").model_copy(update={"replicas": 2})
    with LocalTarget(variants_workdir, ready_timeout_s=120) as deployment:
        endpoint = deployment.start(spec, cpus=cpus)
        assert ready_workers(httpx.get(f"{endpoint.url}/metrics", timeout=10).text) == 2
        workers = psutil.Process(deployment.process(endpoint).pid).children(recursive=True)  # type: ignore[attr-defined]
        workers = [w for w in workers if "--worker-id" in w.cmdline()]
        assert len(workers) == 2
        assert sorted(tuple(w.cpu_affinity()) for w in workers) == [(min(cpus),), (max(cpus),)]
        assert_connections_spread(endpoint, workers)


@pytest.mark.slow
def test_optiserve_serve_replicas_flag_starts_that_many_workers(mlp_onnx: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    materialize_source(resolve_model(str(mlp_onnx)), work)
    port = free_port()
    args = ("-m", mlp_onnx, "-w", work, "-r", "onnxruntime", "--port", port, "--replicas", 2, "--for", 120)
    with serve_cli(*args, cwd=tmp_path) as printed:
        spec = json.loads(next((work / "services").glob("*/service.json")).read_text())
        assert spec["replicas"] == 2
        assert ready_workers(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text) == 2
        row = next(line for line in printed if "intra-op" in line)
        assert "│ 2 " in row or "| 2 " in row, row  # the table's replicas column
