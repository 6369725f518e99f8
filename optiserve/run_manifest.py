"""The record of one run: ``<run folder>/manifest.json``, and the report rebuilt from the folder alone.

A run folder holds the raw results (``bench/``, ``eval/``, ``samples/``, ``skipped.json``) and this
manifest: the effective configuration, the command line, the CPU pinning, where server-side figures
came from, the machine and package versions, the SLO, instance and the whole price table used, and the
variants as they were when the run finished. :func:`write_run_report` reads only the folder, so
``optiserve report RUN_DIR`` reproduces the report the run wrote byte for byte, wherever and whenever it
runs, even after the workdir's variants were rebuilt or the price file changed. The run itself writes
its report through the same function, from what it wrote to disk, so the two cannot drift apart.

The manifest is written when the run starts (an interrupted run still says what it was) and rewritten
when it finishes, atomically both times.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from optiserve.cost import PriceTable
from optiserve.errors import ArtifactError
from optiserve.types import Frozen, MachineInfo, Report, Variant

if TYPE_CHECKING:
    from optiserve.config import ExperimentConfig

MANIFEST_FILE = "manifest.json"
MEASUREMENT_FILE = "measurement.txt"
SCHEMA_VERSION = 1


class RunManifest(Frozen):
    schema_version: int = SCHEMA_VERSION
    started_at: dt.datetime
    finished_at: dt.datetime | None = Field(default=None, description="None while running or if cut off")
    command: str
    model: str
    config: dict[str, Any] = Field(description="the effective ExperimentConfig, defaults filled in")
    cpu_pinning: str
    cpu_affinity: tuple[int, ...] = Field(description="the CPUs the run's own process could use")
    machine: MachineInfo
    packages: dict[str, str]
    slo_ms: float
    instance: str | None = Field(description="None: the price table's instance matching the machine")
    offered_rps: float | None
    prices: PriceTable
    measurement: str | None = Field(default=None, description="where the server-side figures came from")
    variants: dict[str, Variant] = Field(default_factory=dict)


def start_run(config: ExperimentConfig, model: str, run_dir: Path) -> RunManifest:
    """Write the manifest of a run that is starting in ``run_dir`` (prices are read here, once)."""
    from optiserve.cost import load_prices
    from optiserve.hardware import machine_info
    from optiserve.report_html import cpu_pinning, package_versions

    manifest = RunManifest(
        started_at=dt.datetime.now(dt.UTC),
        command=" ".join(sys.argv),
        model=model,
        config=config.model_dump(mode="json"),
        cpu_pinning=cpu_pinning(config),
        cpu_affinity=tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (),
        machine=machine_info(),
        packages=package_versions(),
        slo_ms=config.load.slo_ms,
        instance=config.cost.instance,
        offered_rps=config.cost.offered_rps,
        prices=load_prices(config.cost.prices),
    )
    _write(run_dir, manifest)
    return manifest


def finish_run(run_dir: Path, manifest: RunManifest, variants: list[Variant]) -> RunManifest:
    """The manifest completed: finish time, measurement source, the variants as they are now."""
    measurement = run_dir / MEASUREMENT_FILE
    done = manifest.model_copy(
        update={
            "finished_at": dt.datetime.now(dt.UTC),
            "measurement": measurement.read_text().strip() if measurement.is_file() else None,
            "variants": {v.id: v for v in variants},
        }
    )
    _write(run_dir, done)
    return done


def read_manifest(run_dir: Path) -> RunManifest | None:
    """The run's manifest, or None for a folder written before runs had one."""
    from optiserve.manifest import read_model

    path = run_dir / MANIFEST_FILE
    return read_model(path, RunManifest) if path.is_file() else None


def manifest_context(manifest: RunManifest) -> dict[str, str]:
    """What the HTML report's reproducibility block shows, from the manifest only."""
    from optiserve.report_html import describe_machine

    context = {f"version: {name}": version for name, version in manifest.packages.items()}
    context |= {
        "run's machine": describe_machine(manifest.machine),
        "run's CPU affinity": ", ".join(map(str, manifest.cpu_affinity)) or "unknown",
        "cpu_pinning": manifest.cpu_pinning,
        "command": manifest.command,
        "run started": f"{manifest.started_at:%Y-%m-%d %H:%M:%S} UTC",
        "SLO": f"p99 <= {manifest.slo_ms:g} ms",
        "instance": manifest.instance or "the price table's CPU instance matching the machine",
        "price table": manifest.prices.note or "(no note)",
        "configuration": f"{MANIFEST_FILE} in this folder",
    }
    if manifest.measurement:
        context["server-side figures"] = manifest.measurement
    return context


def write_run_report(run_dir: Path) -> tuple[Report, tuple[Path, Path, Path], RunManifest | None]:
    """Build and write report.json/.md/.html from ``run_dir`` alone.

    With a manifest, a pure function of the folder (the report's time is the run's finish time). A
    folder without one (made before manifests) is priced with the defaults and the current workdir's
    variants, and the caller is told so by the None it gets back.
    """
    from optiserve import pipeline
    from optiserve.report import build_report, write_report

    results, evaluations, skipped = pipeline.load_run(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        variants = pipeline.known_variants(run_dir.parent.parent)
        model = results[0].endpoint.service.variant.model.name if results else "model"
        report = build_report(model, variants, results, evaluations, skipped)
        return report, write_report(report, run_dir, {"command": " ".join(sys.argv)}), None
    if manifest.finished_at is None:
        raise ArtifactError(
            f"{run_dir} holds a run that did not finish ({MANIFEST_FILE} has no finish time)",
            hint="run it again; its partial results are in bench/ and eval/",
        )
    report = build_report(
        manifest.model,
        manifest.variants,
        results,
        evaluations,
        skipped,
        instance=manifest.instance,
        slo_ms=manifest.slo_ms,
        offered_rps=manifest.offered_rps,
        prices=manifest.prices,
        created_at=manifest.finished_at,
    )
    return report, write_report(report, run_dir, manifest_context(manifest)), manifest


def _write(run_dir: Path, manifest: RunManifest) -> None:
    from optiserve.manifest import write_model

    write_model(run_dir / MANIFEST_FILE, manifest)
