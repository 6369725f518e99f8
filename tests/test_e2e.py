"""`optiserve run` end to end, as a user runs it: real export, real servers, real Locust, real report."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MLP_CALLABLE, run_cli

pytestmark = pytest.mark.slow

QUICK = ["--duration", 3, "--warmup", 1, "--eval-samples", 16]


@dataclass
class Run:
    done: subprocess.CompletedProcess[str]
    workdir: Path

    @property
    def run_dir(self) -> Path:
        (only,) = sorted((self.workdir / "results").iterdir())
        return only

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "report.json").read_text())  # type: ignore[no-any-return]

    def rows_by_runtime(self) -> dict[str, dict[str, Any]]:
        return {row["runtime"]: row for row in self.report["rows"]}


def optiserve_run(tmp_path: Path, *args: object) -> Run:
    workdir = tmp_path / "work"
    done = run_cli("run", "--workdir", workdir, *args, cwd=tmp_path, timeout=400)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return Run(done, workdir)


def assert_every_level_measured(run: Run, concurrency: list[int]) -> None:
    assert run.report["rows"]
    for row in run.report["rows"]:
        assert [r["load"]["users"] for r in row["results"]] == concurrency, row["variant_id"]
        for result in row["results"]:
            assert result["throughput_rps"] > 0
            assert result["n_errors"] == 0
            assert result["n_requests"] > 0
            assert Path(result["samples_path"]).is_file()


PRICES = """note: a private price list for the test
instances:
  test-box:
    provider: onprem
    region: lab
    usd_per_hour: 1.23
    vcpu: 2
    memory_gib: 8
"""


@pytest.fixture(scope="module")
def mlp_run(mlp_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The tiny ONNX model, run with a config whose SLO, instance and price file are not the defaults."""
    tmp = tmp_path_factory.mktemp("e2e-onnx")
    (tmp / "prices.yaml").write_text(PRICES)
    config = tmp / "experiment.yaml"
    prices = tmp / "prices.yaml"
    config.write_text(
        f"load:\n  slo_ms: 7.5\ncost:\n  instance: test-box\n  offered_rps: 12\n  prices: {prices}\n"
    )
    return optiserve_run(tmp, config, "--model", mlp_onnx, "-c", "1,2", *QUICK)


def test_run_an_onnx_file(mlp_run: Run) -> None:
    assert_every_level_measured(mlp_run, [1, 2])
    assert set(mlp_run.rows_by_runtime()) == {"onnxruntime"}
    assert (mlp_run.run_dir / "report.md").is_file()
    assert "report.md" in mlp_run.done.stdout
    row = mlp_run.rows_by_runtime()["onnxruntime"]
    assert row["accuracy"]["value"] == 1.0 and row["accuracy"]["n_samples"] == 16


def test_run_a_torch_callable(tmp_path: Path) -> None:
    run = optiserve_run(tmp_path, "--model", MLP_CALLABLE, "--input-shape", 16, "-c", "1", *QUICK)
    assert_every_level_measured(run, [1])
    rows = run.rows_by_runtime()
    assert set(rows) == {"torch-eager", "onnxruntime"}
    for row in rows.values():
        assert row["accuracy"]["metric"] == "top1_agreement"
        assert row["accuracy"]["value"] == 1.0
    assert rows["onnxruntime"]["variant_id"].startswith("mlp.onnx.")
    assert rows["torch-eager"]["variant_id"].startswith("mlp.torch.")


def test_run_the_default_builtin_model(tmp_path: Path) -> None:
    # No --model: efficientnet-lite0 with its real weights. Only its ONNX export here, to keep the suite
    # short; the recommended set (OpenVINO and INT8 too) runs in test_recommended_optimizers_of_the_default.
    run = optiserve_run(tmp_path, "-c", "1", "-o", "onnx-export", *QUICK)
    assert run.report["model"] == "efficientnet-lite0"
    assert_every_level_measured(run, [1])
    rows = run.rows_by_runtime()
    assert set(rows) == {"torch-eager", "onnxruntime"}
    for row in rows.values():
        ev = row["accuracy"]
        assert ev["metric"] == "top1_accuracy"  # the labelled photo set: the gate judges accuracy
        assert ev["reference_value"] >= 0.5 and ev["value"] >= 0.99 * ev["reference_value"]
        assert ev["ratio_ci"] is not None and ev["data"] and "labelled crops" in ev["data"]
        assert row["size_bytes"] > 10_000_000


REPORT_FILES = ("report.json", "report.md", "report.html")


def test_report_rebuilds_the_run_s_report_byte_for_byte(mlp_run: Run) -> None:
    """`optiserve report RUN_DIR` is a pure function of the run folder: the run's SLO, instance and
    prices (from its manifest, not the defaults, not today's price file), the same bytes in all three
    files, even after the price file changed and the workdir's variants are gone."""
    run_dir = mlp_run.run_dir
    original = {name: (run_dir / name).read_bytes() for name in REPORT_FILES}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["slo_ms"] == 7.5 and manifest["instance"] == "test-box"
    assert manifest["prices"]["instances"]["test-box"]["usd_per_hour"] == 1.23
    assert manifest["config"]["load"]["slo_ms"] == 7.5 and manifest["finished_at"]
    assert manifest["cpu_pinning"] and manifest["packages"]["python"] and manifest["machine"]["logical_cpus"]
    assert "--model" in manifest["command"] and manifest["variants"]
    (row,) = mlp_run.report["rows"]
    assert all(c["instance"] == "test-box" for c in row["costs"]), row["costs"]
    assert row["costs"] and all(c["slo_ms"] == 7.5 and c["price_per_hour"] == 1.23 for c in row["costs"])
    assert any(c["offered_rps"] == 12 for c in row["costs"])

    # What the run read is changed or gone: the report must not look at it again.
    (mlp_run.workdir.parent / "prices.yaml").write_text(PRICES.replace("1.23", "9.99"))
    (mlp_run.workdir / "variants").rename(mlp_run.workdir / "variants.moved")
    try:
        for name in REPORT_FILES:
            (run_dir / name).unlink()
        done = run_cli("report", run_dir, cwd=mlp_run.workdir.parent.parent)
    finally:
        (mlp_run.workdir / "variants.moved").rename(mlp_run.workdir / "variants")
        (mlp_run.workdir.parent / "prices.yaml").write_text(PRICES)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stdout
    assert str(run_dir / "report.md") in done.stdout
    for name in REPORT_FILES:
        assert (run_dir / name).read_bytes() == original[name], f"{name} differs from the run's"


def test_report_of_a_folder_without_a_manifest_warns_and_uses_the_defaults(
    mlp_run: Run, tmp_path: Path
) -> None:
    import shutil

    old = tmp_path / "work" / "results" / "old-run"
    shutil.copytree(mlp_run.run_dir, old)
    (old / "manifest.json").unlink()
    done = run_cli("report", old, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "has no manifest.json" in " ".join(done.stdout.split())
    (row,) = json.loads((old / "report.json").read_text())["rows"]
    assert all(c["instance"] != "test-box" for c in row["costs"])  # the defaults, and said so
