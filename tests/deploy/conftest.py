"""Helpers for the chart and `optiserve deploy` tests: the real helm binary, kubernetes-validate, the Pod
Security "restricted" checks and a small PromQL reader. In CI (``CI=true``) a missing helm or
kubernetes-validate fails the tests instead of skipping them."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from optiserve import metrics
from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "helm" / "optiserve"
CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "VirtualService": "networking.istio.io/v1",
}


def unavailable(reason: str) -> None:
    """Skip, or fail in CI, where every tool must be present."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the deploy extra must be installed)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def helm() -> Path:
    from optiserve.deploy.helm import find_helm
    from optiserve.errors import PluginUnavailable

    try:
        return find_helm()
    except PluginUnavailable as e:
        unavailable(e.one_line())
        raise


@pytest.fixture(scope="session")
def kube_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        unavailable("kubernetes-validate is not installed (pip install 'optiserve[deploy]')")
    return kubernetes_validate


# --- helm ---------------------------------------------------------------------------------------------


def helm_run(
    helm: Path, *args: object, values: Mapping[str, Any] | None = None, tmp: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``helm ARGS [-f values.yaml]`` → CompletedProcess (never raises on a non-zero exit)."""
    cmd = [str(helm), *map(str, args)]
    if values is not None:
        assert tmp is not None
        path = tmp / f"values-{abs(hash(yaml.safe_dump(dict(values))))}.yaml"
        path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
        cmd += ["-f", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def template(helm: Path, values: Mapping[str, Any], tmp: Path, namespace: str = "ml") -> list[dict[str, Any]]:
    done = helm_run(helm, "template", "t", CHART, "--namespace", namespace, values=values, tmp=tmp)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


# --- validation -------------------------------------------------------------------------------------------


def validate_object(kube_validate: Any, obj: Mapping[str, Any]) -> None:
    """Core kinds: the Kubernetes OpenAPI schemas, strict (unknown fields fail). CRDs, which those schemas
    lack: the structure every object needs, checked here."""
    kind = obj.get("kind")
    if kind in CRD_KINDS:
        assert obj["apiVersion"] == CRD_KINDS[kind], obj["apiVersion"]
        assert obj["metadata"]["name"] and len(obj["metadata"]["name"]) <= 253
        assert isinstance(obj.get("spec"), dict) and obj["spec"], f"{kind} without a spec"
        return
    kube_validate.validate(dict(obj), kube_validate.latest_version(), strict=True)


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def pod_templates(objects: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every object that makes pods."""
    found = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            found.append((f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]))
    return found


def restricted_violations(pod: Mapping[str, Any]) -> list[str]:
    """Pod Security Standards, "restricted" profile (baseline included), checked field by field, plus
    this chart's own rules: read-only root filesystems and no service-account token."""
    bad: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(f"{field} is set")
    for volume in pod.get("volumes") or []:
        types = set(volume) - {"name"}
        if not types <= RESTRICTED_VOLUMES:
            bad.append(f"volume {volume['name']}: {sorted(types - RESTRICTED_VOLUMES)} not allowed")
    if pod_sc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    if pod.get("automountServiceAccountToken") is not False:
        bad.append("automountServiceAccountToken is not false")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    containers = [
        *(pod.get("initContainers") or []),
        *pod["containers"],
        *(pod.get("ephemeralContainers") or []),
    ]
    for c in containers:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds capabilities {caps['add']}")
        if not (
            sc.get("runAsNonRoot") is True
            or (pod_sc.get("runAsNonRoot") is True and "runAsNonRoot" not in sc)
        ):
            bad.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile is {seccomp!r}")
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"{where}: procMount {sc['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad.append(f"{where}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{where}: root filesystem is writable")
    for sysctl in pod_sc.get("sysctls") or []:
        bad.append(f"sysctl {sysctl['name']}")
    return bad


# --- PromQL ---------------------------------------------------------------------------------------------

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
EXTRA_LABELS = {"le", "namespace", "pod"}


def allowed_series() -> dict[str, metrics.MetricDef]:
    """Every stored series name of the metrics contract: histograms' _bucket/_count/_sum, counters' _total."""
    names: dict[str, metrics.MetricDef] = {}
    for m in metrics.ALL:
        if m.kind == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                names[m.name + suffix] = m
        else:
            names[m.series] = m
    return names


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses. Strings, ranges and Grafana variables are dropped;
    label names come from selectors ``{a="x"}`` and grouping ``by (a, b)``; metric names are the other
    identifiers that are not functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)
    labels: set[str] = set()
    for selector in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", selector))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names, labels


def check_promql(expr: str, recorded: Iterable[str] = ()) -> list[str]:
    """What an expression uses outside the metrics contract (empty: all good)."""
    series = allowed_series()
    names, labels = promql_names(expr)
    problems = [f"unknown metric {n}" for n in sorted(names - set(series) - set(recorded))]
    allowed = set(metrics.IDENTITY_LABELS) | EXTRA_LABELS
    for name in names & set(series):
        allowed |= set(series[name].extra_labels)
    problems += [f"unknown label {lb}" for lb in sorted(labels - allowed)]
    if not names:
        problems.append("no metric at all")
    return problems


def dashboard_queries(configmap: Mapping[str, Any]) -> list[str]:
    """Every PromQL query of the Grafana dashboard: panel targets, and the metric selectors of its
    ``label_values(...)`` variables."""
    import json

    (text,) = configmap["data"].values()
    dash = json.loads(text)
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        m = re.match(r"label_values\((.*),\s*(\w+)\)$", str(query or ""))
        if m:
            queries.append(m.group(1))
            assert m.group(2) in set(metrics.IDENTITY_LABELS) | EXTRA_LABELS, query
    return queries


def rule_queries(rule: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    """(every expr of a PrometheusRule, the names it records)."""
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    return [r["expr"] for r in rules], {r["record"] for r in rules if "record" in r}


def by_kind(objects: Iterable[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [dict(o) for o in objects if o["kind"] == kind]


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
