"""Faults during a benchmark, made for real: a serving worker SIGKILLed in the middle of a load level, and
the run's Prometheus killed in the middle of a run. The benchmark completes either way and says what
happened: the error window and how long the service took to answer again, or that the levels after the
loss have client-side figures only."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from optiserve.deploy.targets.base import ready_workers
from optiserve.deploy.targets.local import LocalTarget
from optiserve.loadtests.runner import run_level, write_payloads
from optiserve.loadtests.stats import Samples, Window, describe_error_window, error_windows
from optiserve.types import Endpoint, LoadSpec, Variant
from tests.conftest import processes_mentioning, random_inputs, run_cli, service_spec

KILL_AT_S = 5.0


def window_of(starts: list[float], latencies_ms: list[float], ok: list[bool]) -> Window:
    samples = Samples(
        np.asarray(starts), np.asarray(latencies_ms), np.asarray(ok), ["" if o else "refused" for o in ok]
    )
    return Window(samples, 10.0)


def test_error_windows_group_failures_and_time_the_recovery() -> None:
    starts = [0.0, 0.5, 1.0, 1.2, 1.4, 1.6, 3.0, 5.0, 5.1, 9.0]
    ok = [True, True, False, False, False, True, True, False, True, True]
    (first, second) = error_windows(window_of(starts, [10.0] * len(starts), ok))
    assert (first.n_errors, first.start_s, round(first.end_s, 3)) == (3, 1.0, 1.41)
    assert first.recovered_after_s == pytest.approx(0.61)  # 1.0 → the answer to the request sent at 1.6
    assert (second.n_errors, second.start_s) == (1, 5.0)
    assert second.recovered_after_s == pytest.approx(0.11)
    never = error_windows(window_of([0.0, 1.0, 1.5], [5.0, 5.0, 5.0], [True, False, False]))
    assert [w.recovered_after_s for w in never] == [None]
    assert error_windows(window_of([0.0, 1.0], [5.0, 5.0], [True, True])) == []


@pytest.fixture
def own_server(onnx_source: Variant, variants_workdir: Path, tmp_path: Path) -> Iterator[Endpoint]:
    """The ONNX MLP on a server of its own (its worker gets killed), with its own BentoML home."""
    with (
        LocalTarget(tmp_path / "serve", ready_timeout_s=120) as deployment,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("BENTOML_HOME", str(tmp_path / "bentoml-home"))
        endpoint = deployment.start(service_spec(onnx_source, variants_workdir, "onnxruntime"))
        env.undo()
        yield endpoint


def serving_workers(endpoint: Endpoint) -> list[psutil.Process]:
    """The worker processes under the ``bentoml serve`` process listening on the endpoint's port."""
    (server,) = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "serve" in (cmd := p.info["cmdline"] or [])
        and f"{endpoint.service.port}" in cmd
        and "--port" in cmd
    ]
    return [c for c in server.children(recursive=True) if "_bentoml_impl.worker" in " ".join(c.cmdline())]


@pytest.mark.slow
def test_a_worker_killed_mid_level_is_an_error_window_and_the_worker_comes_back(
    own_server: Endpoint, tmp_path: Path, figures: Callable[[str, object], None]
) -> None:
    (worker,) = serving_workers(own_server)
    payloads = write_payloads(tmp_path / "payloads.jsonl", random_inputs(8), "input")
    load = LoadSpec(scenario="closed-loop", load_model="closed", users=2, duration_s=14.0, warmup_s=1.0)
    killer = threading.Timer(KILL_AT_S, lambda: worker.send_signal(signal.SIGKILL))
    killer.start()
    try:
        result = run_level(own_server, load, payloads, tmp_path / "out")
    finally:
        killer.cancel()
    windows = result.integrity.error_windows
    print(f"fault: worker SIGKILLed at {KILL_AT_S} s; {result.n_requests} requests, {result.n_errors} failed")
    for w in windows:
        print(f"  {describe_error_window(w)}")
    figures("worker SIGKILL: requests / failed", f"{result.n_requests} / {result.n_errors}")
    for w in windows:
        figures(
            "worker SIGKILL: recovered after (s)",
            f"{w.recovered_after_s:.2f}" if w.recovered_after_s else "never",
        )
    assert result.n_errors > 0 and windows, "killing the worker must show as failed requests"
    assert all(w.recovered_after_s is not None for w in windows), windows
    assert max(w.recovered_after_s or 0 for w in windows) < 30
    assert any(f.startswith("errors: ") and "answering again" in f for f in result.integrity.flags)
    # the level went on after the recovery: requests succeeded after the last failure
    assert result.n_requests - result.n_errors > 0
    (restarted,) = serving_workers(own_server)
    assert restarted.pid != worker.pid
    assert httpx.get(f"{own_server.url}/v2/health/ready", timeout=10).status_code == 200
    # the killed worker's ready gauge is not counted beside its successor's
    assert ready_workers(httpx.get(f"{own_server.url}/metrics", timeout=10).text) == 1


@pytest.mark.slow
def test_prometheus_killed_mid_run_leaves_client_side_figures_and_a_warning(
    mlp_onnx: Path, tmp_path: Path, figures: Callable[[str, object], None]
) -> None:
    if shutil.which("prometheus") is None:
        import os

        if os.environ.get("CI") == "true":
            pytest.fail("prometheus not on PATH in CI: `make system-deps` must install it")
        pytest.skip("prometheus not on PATH (make system-deps installs it)")
    workdir = tmp_path / "work"
    killed: list[int] = []

    def kill_prometheus_after_the_first_level() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if list(workdir.glob("results/*/bench/*.json")):
                for p in processes_mentioning(str(workdir)):
                    if Path(p.cmdline()[0]).name == "prometheus":
                        p.send_signal(signal.SIGKILL)
                        killed.append(p.pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_prometheus_after_the_first_level, daemon=True)
    killer.start()
    args = ("--model", mlp_onnx, "-o", "onnx-export", "-c", "1,2,3", "--duration", 3, "--warmup", 1)
    done = run_cli("run", "--workdir", workdir, *args, "--eval-samples", 16, cwd=tmp_path, timeout=400)
    killer.join(timeout=5)
    assert killed, "the test never found the run's Prometheus to kill"
    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = (workdir / "results").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    (row,) = report["rows"]
    levels = row["results"]
    assert [r["load"]["users"] for r in levels] == [1, 2, 3]
    assert levels[0]["server"] is not None  # measured before the kill
    lost = [r for r in levels if r["server"] is None]
    figures(
        "Prometheus killed: levels completed / lost", f"{len(levels)} / 0 (server-side lost on {len(lost)})"
    )
    assert lost, "no level lost its server-side figures"
    for r in lost:
        assert r["n_requests"] > 0 and r["throughput_rps"] > 0  # the client-side figures stand
        assert any(f.startswith("no server-side figures (") for f in r["integrity"]["flags"]), r["integrity"]
    assert "lost from" in (run_dir / "measurement.txt").read_text()
    assert "no server-side figures" in (run_dir / "report.md").read_text()
    assert "lost from" in json.loads((run_dir / "manifest.json").read_text())["measurement"]
