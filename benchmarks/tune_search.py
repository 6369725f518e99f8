"""Bayesian search (Optuna's TPE) against the full grid, on efficientnet-lite0, in one run.

Builds the default model's variants once (`optiserve optimize`: FP32 ONNX, OpenVINO IR and the INT8
ONNX recipe, each evaluated so the accuracy gate applies), then runs `optiserve tune` twice in the same
workdir, as a user would: the whole grid, then TPE with at most a third of the grid's trials. Each trial
serves its configuration and finds the highest open-loop rate whose p99 meets the SLO (same CPU pinning,
scenario and integrity checks as `bench`). Printed: the grid's size and optimum, TPE's best, the ratio of
their costs, the trials each used, and whether the goal (within 10% of the grid's cost with at most a
third of its trials) was met.

    python benchmarks/tune_search.py                   # about 15 minutes on 2 CPUs
    python benchmarks/tune_search.py --slo 40 --bayes-trials 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GOAL_COST_RATIO, GOAL_TRIAL_SHARE = 1.10, 1 / 3
OPTIMIZERS = ("onnx-export", "openvino-fp32", "ort-int8-static")


def cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "optiserve.cli", *map(str, args)]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 9):
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def tune(work: Path, config: Path, strategy: str, trials: int | None) -> dict[str, object]:
    started = time.monotonic()
    extra = ["--trials", trials] if trials else []
    cli("tune", config, "--strategy", strategy, *extra, cwd=work)
    (out,) = sorted((work / "w" / "results").glob("*-tune"))[-1:]
    report: dict[str, object] = json.loads((out / "tune.json").read_text())
    report["seconds"] = time.monotonic() - started
    report["folder"] = str(out)
    return report


def best_line(report: dict[str, object]) -> str:
    best = report["recommended"]
    if not isinstance(best, dict):
        return "none met the SLO"
    figures = f"{best['capacity_rps']:.1f} req/s, p99 {best['p99_ms']:.1f} ms"
    return f"${best['usd_per_million']:.4f}/1M — {best['label']} ({figures})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slo", type=float, default=50.0, help="p99 bound, ms")
    parser.add_argument("--bayes-trials", type=int, default=None, help="default: a third of the grid")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per rate level")
    parser.add_argument("--keep", type=Path, default=None, help="work here instead of a temporary folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tune-search.") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(
            f"building efficientnet-lite0 variants ({', '.join(OPTIMIZERS)}) in {work / 'w'} ...", flush=True
        )
        chosen = [arg for name in OPTIMIZERS for arg in ("-o", name)]
        cli("optimize", "--workdir", work / "w", *chosen, "--eval-samples", 256, cwd=work)
        config = work / "tune.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "workdir": "w",
                    "load": {"slo_ms": args.slo},
                    "tune": {
                        "duration_s": args.duration,
                        "warmup_s": 1.0,
                        "steps": 5,
                        "min_rate": 40.0,
                        "max_rate": 1000.0,
                        "space": {
                            "runtimes": ["onnxruntime", "openvino"],
                            "max_batch_size": [2, 4, 8],
                            "max_latency_ms": [100, 1000],
                        },
                    },
                }
            )
        )
        grid = tune(work, config, "grid", None)
        size = int(grid["grid_size"])  # type: ignore[call-overload]
        allowed = args.bayes_trials or max(1, math.floor(size * GOAL_TRIAL_SHARE))
        bayes = tune(work, config, "bayesian", allowed)

    grid_trials, bayes_trials = len(grid["trials"]), len(bayes["trials"])  # type: ignore[arg-type]
    print(f"machine: {os.cpu_count()} CPUs; SLO p99 <= {args.slo:g} ms; levels of {args.duration:g} s")
    print(f"grid: {size} configurations, {grid_trials} measured in {grid['seconds']:.0f} s")
    print(f"  optimum: {best_line(grid)}")
    print(f"bayesian (TPE): {bayes_trials} measured in {bayes['seconds']:.0f} s")
    print(f"  best: {best_line(bayes)}")
    g, b = grid["recommended"], bayes["recommended"]
    if isinstance(g, dict) and isinstance(b, dict):
        ratio = b["usd_per_million"] / g["usd_per_million"]
        share = bayes_trials / size
        met = ratio <= GOAL_COST_RATIO and share <= GOAL_TRIAL_SHARE + 1e-9
        print(
            f"cost ratio bayesian / grid: {ratio:.3f} (goal <= {GOAL_COST_RATIO:.2f}); "
            f"trials {bayes_trials}/{size} = {share:.2f} of the grid (goal <= {GOAL_TRIAL_SHARE:.2f})"
            f" → {'met' if met else 'NOT met'}"
        )
        return 0 if met else 1
    print("goal: not measurable (a search found nothing that met the SLO)")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
