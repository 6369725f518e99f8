"""`optiserve deploy` / `undeploy` with the real helm: render real variants of the tiny MLP to manifests
and check they round-trip (labels, selectors, PromQL against the metrics contract); without a cluster,
one line; with one (`pytest -m cluster`), a real install that becomes ready."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from optiserve.manifest import load_variant
from tests.conftest import MLP_CALLABLE, error_lines, run_cli
from tests.deploy.conftest import (
    by_kind,
    check_promql,
    dashboard_queries,
    matches,
    pod_templates,
    restricted_violations,
    rule_queries,
    validate_object,
)

MLP = ("-m", MLP_CALLABLE, "--input-shape", "16", "-w", "w")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, helm: Path) -> Path:
    """Real variants of the MLP: the torch source and its ONNX export (evaluated, so the gate passes)."""
    root = tmp_path_factory.mktemp("deploy")
    done = run_cli("optimize", *MLP, "-o", "onnx-export", "--eval-samples", "16", cwd=root)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def variants(workdir: Path) -> dict[str, Any]:
    return {v.id: v for v in (load_variant(d) for d in (workdir / "w" / "variants").iterdir())}


@pytest.fixture(scope="module")
def rendered(workdir: Path, variants: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    onnx = next(v for v in variants if ".onnx." in v)
    torch = next(v for v in variants if ".torch." in v)
    done = run_cli(
        "deploy",
        *MLP,
        "--image-repository",
        "registry.example.com/ml",
        "--weights",
        f"{onnx}=90,{torch}=10",
        "--namespace",
        "ml",
        "--release",
        "ab",
        "--set",
        "monitoring.enabled=true",
        "--set",
        "traffic.gateway.enabled=true",
        "--set",
        "traffic.gateway.name=public",
        "--render",
        "out",
        cwd=workdir,
    )
    assert done.returncode == 0, done.stderr
    files = sorted((workdir / "out").glob("*.yaml"))
    assert f"Rendered {len(files)} objects" in done.stdout
    objects = [yaml.safe_load(f.read_text()) for f in files]
    assert all(f.name.split("-", 2)[1] == o["kind"].lower() for f, o in zip(files, objects, strict=True))
    values = yaml.safe_load((workdir / "w" / "deploy" / "values.yaml").read_text())
    return objects, values


def test_each_deployment_names_its_variant_and_runtime(
    rendered: tuple[list[dict[str, Any]], dict[str, Any]], variants: dict[str, Any]
) -> None:
    objects, values = rendered
    deployments = by_kind(objects, "Deployment")
    served = {
        (v.id, rt)
        for v in variants.values()
        for rt in (("onnxruntime",) if v.format == "onnx" else ("torch-eager",))
    }
    seen = set()
    for dep in deployments:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        variant = variants[labels["optiserve.io/variant"]]
        runtime = labels["optiserve.io/runtime"]
        seen.add((variant.id, runtime))
        assert labels["optiserve.io/model"] == "mlp" and labels["optiserve.io/precision"] == variant.precision
        (server,) = dep["spec"]["template"]["spec"]["containers"]
        assert server["image"] == f"registry.example.com/ml/{variant.id}:{runtime}"
        env = {e["name"]: e.get("value") for e in server["env"]}
        if "OPTISERVE_SERVICE_SPEC" in env:  # only where a local Bento was built with other settings
            spec_cm = next(
                c
                for c in by_kind(objects, "ConfigMap")
                if c["metadata"]["name"] == dep["metadata"]["name"] + "-spec"
            )
            spec = yaml.safe_load(spec_cm["data"]["service.json"])
            assert spec["variant"]["id"] == variant.id and spec["runtime"] == runtime
        cpu = server["resources"]["requests"]["cpu"]
        assert cpu == server["resources"]["limits"]["cpu"] == "1500m"  # 1 intra-op thread + 0.5
    assert seen == served
    assert {e["variantId"] for e in values["variants"]} == set(variants)


def test_selectors_match_the_pods(rendered: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    objects, _ = rendered
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind(objects, "Deployment")]
    services = by_kind(objects, "Service")
    for pod in pods:
        own = [s for s in services if matches(s["spec"]["selector"], pod)]
        assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in own} == {"server", "entry"}
        variant_svc = next(
            s for s in own if s["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
        )
        assert variant_svc["metadata"]["labels"]["optiserve.io/variant"] == pod["optiserve.io/variant"]
    (monitor,) = by_kind(objects, "ServiceMonitor")
    scraped = [
        s for s in services if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert len(scraped) == len(pods)
    port = monitor["spec"]["endpoints"][0]["port"]
    assert all(port in {p["name"] for p in s["spec"]["ports"]} for s in scraped)
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    for dep in by_kind(objects, "Deployment"):
        assert (
            dep["spec"]["selector"]["matchLabels"].items()
            <= dep["spec"]["template"]["metadata"]["labels"].items()
        )


def test_weights_reach_the_route(
    rendered: tuple[list[dict[str, Any]], dict[str, Any]], variants: dict[str, Any]
) -> None:
    objects, values = rendered
    (route,) = by_kind(objects, "HTTPRoute")
    weights = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    onnx = next(e["name"] for e in values["variants"] if ".onnx." in e["variantId"])
    torch = next(e["name"] for e in values["variants"] if ".torch." in e["variantId"])
    assert weights == {f"ab-optiserve-{onnx}": 90, f"ab-optiserve-{torch}": 10}
    assert values["loadgen"]["target"] and len(values["loadgen"]["payloads"].splitlines()) == 8


def test_promql_uses_only_the_metrics_contract(rendered: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    objects, _ = rendered
    (rule,) = by_kind(objects, "PrometheusRule")
    exprs, recorded = rule_queries(rule)
    (dashboard,) = [
        c for c in by_kind(objects, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    queries = [*exprs, *dashboard_queries(dashboard)]
    assert len(queries) > 10
    for query in queries:
        assert check_promql(query, recorded) == [], query


def test_rendered_objects_are_valid_and_restricted(
    rendered: tuple[list[dict[str, Any]], dict[str, Any]], kube_validate: Any
) -> None:
    objects, _ = rendered
    for obj in objects:
        validate_object(kube_validate, obj)
    for name, pod in pod_templates(objects):
        assert restricted_violations(pod) == [], name


def test_bad_weights_are_one_line(workdir: Path) -> None:
    done = run_cli("deploy", *MLP, "--weights", "nope=100", "--render", "out2", cwd=workdir)
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert "'nope' is not a deployed variant" in line
    done = run_cli("deploy", *MLP, "--set", "variants[0].replicas=-1", "--render", "out2", cwd=workdir)
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert "helm template failed" in line and "/variants/0/replicas" in line


def cluster_reachable() -> bool:
    try:
        return subprocess.run(["kubectl", "cluster-info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_without_a_cluster_deploy_is_one_line(workdir: Path) -> None:
    if cluster_reachable():
        pytest.skip("a Kubernetes cluster is reachable here")
    for args in (("deploy", *MLP), ("undeploy", "--release", "x")):
        done = run_cli(*args, cwd=workdir)
        assert done.returncode == 7, done.stderr
        (line,) = error_lines(done.stderr)
        assert "no Kubernetes cluster is reachable" in line and "--render" in line
        assert len(done.stderr.strip().splitlines()) == 1
    assert (workdir / "w" / "deploy" / "values.yaml").is_file()


@pytest.fixture(scope="module")
def live_cluster() -> None:
    """Module-scoped, and first in the test's arguments, so the skip comes before the variants are made."""
    if not cluster_reachable():
        pytest.skip("no Kubernetes cluster: `kubectl cluster-info` fails")


@pytest.fixture
def namespace(live_cluster: None) -> Iterator[str]:
    name = f"optiserve-test-{uuid.uuid4().hex[:6]}"
    yield name
    subprocess.run(["kubectl", "delete", "namespace", name, "--wait=false"], capture_output=True, check=False)


@pytest.mark.cluster
@pytest.mark.slow
def test_install_on_a_live_cluster(live_cluster: None, workdir: Path, namespace: str) -> None:
    """Needs the Bento images in the cluster: `optiserve build --containerize` for these variants, then
    `kind load docker-image <id>:<runtime>` (see helm/README.md). OPTISERVE_TEST_IMAGE_REPOSITORY sets the
    registry prefix (default: none, the images as `bentoml containerize` tags them)."""
    import os

    repository = os.environ.get("OPTISERVE_TEST_IMAGE_REPOSITORY", "")
    args = ("--image-repository", repository) if repository else ()
    deployed = run_cli(
        "deploy",
        *MLP,
        *args,
        "--namespace",
        namespace,
        "--release",
        "t",
        "--wait-timeout",
        "300",
        cwd=workdir,
        timeout=420,
    )
    assert deployed.returncode == 0, deployed.stderr
    assert f".{namespace}.svc:3000" in deployed.stdout
    ready = subprocess.run(
        [
            "kubectl",
            "-n",
            namespace,
            "wait",
            "--for=condition=Available",
            "deployment",
            "--all",
            "--timeout=60s",
        ],
        capture_output=True,
        text=True,
    )
    assert ready.returncode == 0, ready.stderr
    removed = run_cli("undeploy", "--release", "t", "--namespace", namespace, cwd=workdir, timeout=420)
    assert removed.returncode == 0, removed.stderr


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory: pytest.TempPathFactory, helm: Path) -> tuple[Path, list[dict[str, Any]]]:
    """efficientnet-lite0's ONNX export (real weights; not evaluated, to keep it to ~20 s), rendered."""
    from optiserve.models.base import BuiltinModel

    avail = BuiltinModel.get("efficientnet-lite0").availability()
    if not avail.ok:
        pytest.skip(f"efficientnet-lite0 is unavailable: {avail.reason}")
    root = tmp_path_factory.mktemp("effnet")
    model = ("-m", "efficientnet-lite0", "-w", "w")
    done = run_cli("optimize", *model, "-o", "onnx-export", "--no-eval", cwd=root)
    assert done.returncode == 0, done.stderr
    done = run_cli("deploy", *model, "-r", "onnxruntime", "--render", "out", cwd=root)
    assert done.returncode == 0, done.stderr
    return root, [yaml.safe_load(f.read_text()) for f in sorted((root / "out").glob("*.yaml"))]


def test_efficientnet_onnx_variant_renders(
    efficientnet: tuple[Path, list[dict[str, Any]]], kube_validate: Any
) -> None:
    root, objects = efficientnet
    (dep,) = by_kind(objects, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["optiserve.io/variant"].startswith("efficientnet-lite0.onnx.")
    assert (
        labels["optiserve.io/runtime"] == "onnxruntime"
        and labels["optiserve.io/model"] == "efficientnet-lite0"
    )
    (server,) = dep["spec"]["template"]["spec"]["containers"]
    assert server["image"] == f"{labels['optiserve.io/variant']}:onnxruntime"
    assert server["resources"]["requests"]["memory"] == "640Mi"  # 512 MiB + 4 x the 18.7 MB artifact
    for obj in objects:
        validate_object(kube_validate, obj)
    values = yaml.safe_load((root / "w" / "deploy" / "values.yaml").read_text())
    assert values["loadgen"]["payloads"] == ""  # one raw 3x224x224 tensor is over the ConfigMap budget
