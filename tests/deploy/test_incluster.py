"""`optiserve bench --in-cluster`: the workers' logs → one samples file → a BenchResult; and the
one-line error where no cluster answers."""

from __future__ import annotations

from pathlib import Path

from optiserve.deploy.incluster import merge_samples, samples_from_log, started_at
from optiserve.loadtests.stats import read_samples
from tests.conftest import MLP_CALLABLE, error_lines, run_cli

WORKER_LOG = """\
[2026-11-25 16:00:00] worker-1/INFO/locust.main: Starting Locust 2.47.0
--- samples.csv (loadgen-worker-abc)
start_s,latency_ms,ok,error
1764086400.000,12.5,1,
1764086400.100,13.0,1,
1764086400.200,900.0,0,http-503
"""


def test_worker_logs_become_one_samples_file(tmp_path: Path) -> None:
    assert samples_from_log(WORKER_LOG) == [
        "1764086400.000,12.5,1,",
        "1764086400.100,13.0,1,",
        "1764086400.200,900.0,0,http-503",
    ]
    other = WORKER_LOG.replace("400.", "401.").replace("abc", "def")
    path = tmp_path / "s.csv"
    assert merge_samples([WORKER_LOG, other, "no marker here\n1,2,3,4\n"], path) == 6
    samples = read_samples(path)
    assert len(samples) == 6 and samples.ok.sum() == 4 and samples.error.count("http-503") == 2
    assert started_at(path).year == 2025


def test_bench_in_cluster_without_a_cluster_is_one_line(tmp_path: Path) -> None:
    made = run_cli(
        "optimize", "-m", MLP_CALLABLE, "--input-shape", "16", "-w", "w", "-o", "onnx-export", cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    result = run_cli(
        "bench", "-m", MLP_CALLABLE, "--input-shape", "16", "-w", "w", "--in-cluster", cwd=tmp_path
    )
    assert result.returncode == 7
    (line,) = error_lines(result.stderr)
    assert "no Kubernetes cluster is reachable" in line
    assert not (tmp_path / "w" / "results").exists()  # nothing written
