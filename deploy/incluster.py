"""Collect the results of the chart's in-cluster load test (`optiserve bench --in-cluster`).

With ``loadgen.enabled``, the chart runs a Locust master Job and a Job of workers against one variant's
Service; each worker prints its raw samples (``start_s,latency_ms,ok,error``) after a
``--- samples.csv (<pod>)`` line when it finishes. Here: wait for the master Job to complete, read every
worker pod's log with ``kubectl logs``, merge the samples into one file and build the same BenchResult
a local run would (warm-up cut, percentiles with 95% intervals, integrity checks).
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path
from typing import Any

from optiserve.errors import LoadTestError, ServingError
from optiserve.fsutil import atomic_write_text

SAMPLES_MARKER = "--- samples.csv"
HEADER = "start_s,latency_ms,ok,error"
ROLE_LABEL = "optiserve.io/loadgen-role"
VARIANT_LABEL = "optiserve.io/variant"


def samples_from_log(log: str) -> list[str]:
    """The sample rows a worker printed after its marker line(s) (headers dropped)."""
    rows: list[str] = []
    inside = False
    for line in log.splitlines():
        if line.startswith("--- "):
            inside = line.startswith(SAMPLES_MARKER)
            continue
        if inside and line and line != HEADER and line.count(",") >= 3:
            rows.append(line)
    return rows


def merge_samples(logs: list[str], path: Path) -> int:
    """Write every worker's rows to one samples CSV; returns the row count."""
    rows = [row for log in logs for row in samples_from_log(log)]
    atomic_write_text(path, "\n".join([HEADER, *rows]) + "\n")
    return len(rows)


def _kubectl(*args: str, timeout_s: float = 60) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ServingError("kubectl is not on PATH", hint="install kubectl to collect in-cluster results")
    try:
        done = subprocess.run([kubectl, *args], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise LoadTestError(f"kubectl {' '.join(args[:2])} did not answer in {timeout_s:.0f}s") from e
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()
        raise LoadTestError(
            f"kubectl {' '.join(args[:2])} failed: {(last[-1] if last else 'no output')[:200]}"
        )
    return done.stdout


def selector(release: str, role: str) -> str:
    return f"app.kubernetes.io/instance={release},app.kubernetes.io/component=loadgen,{ROLE_LABEL}={role}"


def collect(release: str, namespace: str, out: Path, wait_timeout_s: float = 3600) -> tuple[str, int]:
    """Wait for the master Job, merge the workers' samples into ``out``: (target variant id, rows)."""
    import json

    jobs: dict[str, Any] = json.loads(
        _kubectl("get", "jobs", "-n", namespace, "-l", selector(release, "master"), "-o", "json")
    )
    if not jobs.get("items"):
        raise LoadTestError(
            f"no in-cluster load test in release {release!r}, namespace {namespace!r}",
            hint="deploy with --set loadgen.enabled=true --set loadgen.target=<variant name>",
        )
    job = jobs["items"][0]
    variant_id = job["metadata"]["labels"].get(VARIANT_LABEL, "")
    _kubectl(
        "wait", "--for=condition=complete", f"job/{job['metadata']['name']}", "-n", namespace,
        f"--timeout={int(wait_timeout_s)}s", timeout_s=wait_timeout_s + 30,
    )  # fmt: skip
    pods = _kubectl("get", "pods", "-n", namespace, "-l", selector(release, "worker"), "-o", "name").split()
    if not pods:
        raise LoadTestError(f"the in-cluster load test of {release!r} has no worker pods left to read")
    logs = [_kubectl("logs", "-n", namespace, pod, timeout_s=120) for pod in pods]
    rows = merge_samples(logs, out)
    if rows == 0:
        raise LoadTestError(f"the {len(pods)} worker pod(s) of {release!r} printed no samples")
    return variant_id, rows


def started_at(path: Path) -> dt.datetime:
    """When the first sample was sent (the samples carry epoch seconds)."""
    first = path.read_text().splitlines()[1].split(",")[0]
    return dt.datetime.fromtimestamp(float(first), dt.UTC)
