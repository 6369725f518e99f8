"""What `optiserve doctor` checks: every registered plugin, and the external tools later stages use."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

from optiserve.hardware import cuda_available

Row = tuple[str, str, bool, str]


def plugin_rows() -> list[Row]:
    from optiserve.deploy.targets.base import Target
    from optiserve.loadtests.scenarios.base import Scenario
    from optiserve.models.base import BuiltinModel
    from optiserve.optimizers.base import Optimizer
    from optiserve.services.runtimes.base import Runtime

    rows: list[Row] = []
    for kind, base in (
        ("model", BuiltinModel),
        ("optimizer", Optimizer),
        ("runtime", Runtime),
        ("scenario", Scenario),
        ("target", Target),
    ):
        for name, cls in base.registry().items():
            avail = cls.availability()
            rows.append((kind, name, avail.ok, cls.description if avail.ok else avail.reason))
    return rows


def _package(name: str, extra: str) -> Row:
    ok = importlib.util.find_spec(name) is not None
    return ("package", name, ok, "importable" if ok else f"missing: pip install 'optiserve[{extra}]'")


def _binary(name: str, why: str, install: str) -> Row:
    path = shutil.which(name)
    return ("tool", name, path is not None, path or f"not on PATH ({why}); {install}")


def _cluster() -> Row:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return ("tool", "kubernetes", False, "kubectl is not on PATH")
    try:
        done = subprocess.run(
            [kubectl, "cluster-info", "--request-timeout=3s"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return ("tool", "kubernetes", False, f"kubectl cluster-info failed: {e}")
    if done.returncode != 0:
        return ("tool", "kubernetes", False, "no reachable cluster (`kubectl cluster-info` failed)")
    return ("tool", "kubernetes", True, done.stdout.splitlines()[0] if done.stdout else "reachable")


def tool_rows() -> list[Row]:
    ok, why = cuda_available()
    return [
        _package("bentoml", "serve"),
        _package("locust", "load"),
        _binary("prometheus", "server-side metrics", "apt-get install prometheus"),
        _binary("helm", "Kubernetes deploy", "needed once the Helm chart lands"),
        _binary("chromium", "HTML report checks", "apt-get install chromium"),
        _cluster(),
        ("hardware", "cuda", ok, why),
    ]
