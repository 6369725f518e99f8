"""The helm/optiserve chart with the real helm binary: lint, render for many value sets, validate every
object against the Kubernetes schemas (strict), Pod Security "restricted" on every pod, and bad values
refused with a message naming the field."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import (
    CHART,
    by_kind,
    check_promql,
    dashboard_queries,
    helm_run,
    matches,
    pod_templates,
    restricted_violations,
    rule_queries,
    template,
    validate_object,
)


def variant(name: str, runtime: str = "onnxruntime", **extra: Any) -> dict[str, Any]:
    vid = name.replace("-", ".")
    return {
        "name": name,
        "variantId": vid,
        "model": "mlp",
        "runtime": runtime,
        "precision": "fp32",
        "image": {"repository": f"registry.example.com/ml/{vid}", "tag": runtime},
        **extra,
    }


RUNTIMES = ("onnxruntime", "openvino", "torch-eager", "onnxruntime", "openvino")
PAYLOAD = '{"body": "eyJpbnB1dHMiOltdfQ==", "header_length": 12}'

CASES: dict[str, dict[str, Any]] = {
    "one-variant": {"variants": [variant("mlp-onnx-a1")]},
    "five-variants": {
        "variants": [variant(f"mlp-v{i}-b{i}", rt, replicas=i) for i, rt in enumerate(RUNTIMES)],
    },
    "gpu": {
        "variants": [
            variant(
                "mlp-trt-c1",
                "tensorrt",
                precision="fp16",
                gpu=1,
                gpuNodeSelector={"nvidia.com/gpu.present": "true"},
            )
        ]
    },
    "ab-weights": {
        "variants": [variant("mlp-onnx-a1"), variant("mlp-ov-d2", "openvino")],
        "traffic": {
            "weights": {"mlp-onnx-a1": 90, "mlp-ov-d2": 10},
            "gateway": {"enabled": True, "name": "public", "namespace": "gateways"},
            "istio": {"enabled": True},
        },
    },
    "mirror": {
        "variants": [variant("mlp-onnx-a1"), variant("mlp-ov-d2", "openvino")],
        "traffic": {
            "weights": {"mlp-onnx-a1": 100},
            "mirror": "mlp-ov-d2",
            "gateway": {"enabled": True, "name": "public"},
            "istio": {"enabled": True},
        },
    },
    "loadgen": {
        "variants": [variant("mlp-onnx-a1")],
        "loadgen": {"enabled": True, "target": "mlp-onnx-a1", "workers": 3, "payloads": PAYLOAD},
    },
    "monitoring": {
        "variants": [variant("mlp-onnx-a1"), variant("mlp-ov-d2", "openvino")],
        "monitoring": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "artifact-url": {
        "variants": [
            variant("mlp-http-e1", artifact={"source": "url", "url": "https://models.example.com/a.tar.gz"}),
            variant("mlp-s3-e2", artifact={"source": "url", "url": "s3://models/mlp.s3.e2/"}),
            variant("mlp-oci-e3", artifact={"source": "url", "url": "oci://ghcr.io/acme/mlp:e3"}),
            variant("mlp-pvc-e4", artifact={"source": "pvc", "claimName": "models", "subPath": "mlp.pvc.e4"}),
        ]
    },
    "autoscaling-and-spec": {
        "variants": [
            variant(
                "mlp-onnx-a1",
                autoscaling={
                    "enabled": True,
                    "requestsPerSecond": 50,
                    "targetCPUUtilizationPercentage": None,
                },
                pdb={"enabled": True, "minAvailable": 1},
                serviceSpec={"runtime": "onnxruntime", "variant_dir": "elsewhere", "port": 3001},
            )
        ]
    },
}


@pytest.fixture(scope="module")
def rendered(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("values")
    return {name: template(helm, values, tmp) for name, values in CASES.items()}


# --- lint and schemas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [None, *CASES])
def test_lint_strict_is_clean(helm: Path, tmp_path: Path, case: str | None) -> None:
    values = CASES[case] if case else None
    done = helm_run(helm, "lint", "--strict", CHART, values=values, tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("case", list(CASES))
def test_every_object_validates(
    rendered: dict[str, list[dict[str, Any]]], kube_validate: Any, case: str
) -> None:
    objects = rendered[case]
    assert objects
    for obj in objects:
        validate_object(kube_validate, obj)


@pytest.mark.parametrize("case", list(CASES))
def test_every_pod_is_restricted(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    pods = pod_templates(rendered[case])
    assert pods
    for name, pod in pods:
        assert restricted_violations(pod) == [], name
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, name


def test_restricted_checks_catch_violations() -> None:
    """The checker itself: a root, privileged, hostPath pod fails on every count."""
    pod = {
        "hostNetwork": True,
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "privileged": True,
                    "runAsUser": 0,
                    "capabilities": {"add": ["SYS_ADMIN"]},
                },
            }
        ],
    }
    found = " | ".join(restricted_violations(pod))
    for expected in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "drop ALL"):
        assert expected in found
    for expected in (
        "SYS_ADMIN",
        "runAsNonRoot",
        "runAsUser 0",
        "seccompProfile",
        "writable",
        "ServiceAccountToken",
    ):
        assert expected in found


# --- what the objects say -----------------------------------------------------------------------------------


def test_one_deployment_and_service_per_variant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["five-variants"]
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    assert len(deployments) == 5
    assert len(services) == 6  # one per variant + the stable entry Service
    for i, (dep, rt) in enumerate(zip(deployments, RUNTIMES, strict=True)):
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["replicas"] == i
        assert pod_labels["optiserve.io/runtime"] == rt
        assert pod_labels["optiserve.io/variant"] == f"mlp.v{i}.b{i}"
        own = [s for s in services if matches(s["spec"]["selector"], pod_labels)]
        assert len(own) == 2  # its own Service and the entry Service
        (server,) = dep["spec"]["template"]["spec"]["containers"]
        probes = {
            p: server[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        assert probes == {
            "startupProbe": "/v2/health/ready",
            "readinessProbe": "/v2/health/ready",
            "livenessProbe": "/v2/health/live",
        }
        env = {e["name"]: e.get("value") for e in server["env"]}
        assert "OPTISERVE_SERVICE_SPEC" not in env  # the Bento's own spec
        assert env["BENTOML_HOME"] == "/var/lib/bentoml"
        spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
        assert matches(spread["labelSelector"]["matchLabels"], pod_labels)
    entry = next(s for s in services if s["metadata"]["name"] == "t-optiserve")
    assert all(
        matches(entry["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]) for d in deployments
    )
    assert len(by_kind(objects, "PodDisruptionBudget")) == 5
    assert by_kind(objects, "ServiceAccount")[0]["automountServiceAccountToken"] is False


def test_gpu_variant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (dep,) = by_kind(rendered["gpu"], "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_ab_weights_in_httproute_and_virtualservice(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["ab-weights"]
    (route,) = by_kind(objects, "HTTPRoute")
    assert route["spec"]["parentRefs"][0] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "public",
        "namespace": "gateways",
    }
    backends = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert backends == {"t-optiserve-mlp-onnx-a1": 90, "t-optiserve-mlp-ov-d2": 10}
    services = {s["metadata"]["name"] for s in by_kind(objects, "Service")}
    assert set(backends) <= services
    (vs,) = by_kind(objects, "VirtualService")
    dests = {r["destination"]["host"]: r["weight"] for r in vs["spec"]["http"][0]["route"]}
    assert dests == {
        "t-optiserve-mlp-onnx-a1.ml.svc.cluster.local": 90,
        "t-optiserve-mlp-ov-d2.ml.svc.cluster.local": 10,
    }
    assert vs["spec"]["hosts"] == ["t-optiserve.ml.svc.cluster.local"]
    policy = by_kind(objects, "NetworkPolicy")[0]["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateways"}}} in policy


def test_equal_weights_when_none_given(helm: Path, tmp_path: Path) -> None:
    values = {
        "variants": [variant("a-x"), variant("b-x"), variant("c-x")],
        "traffic": {"gateway": {"enabled": True, "name": "g"}, "istio": {"enabled": True}},
    }
    objects = template(helm, values, tmp_path)
    (route,) = by_kind(objects, "HTTPRoute")
    assert [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]] == [34, 33, 33]


def test_mirror(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["mirror"]
    (route,) = by_kind(objects, "HTTPRoute")
    rule = route["spec"]["rules"][0]
    assert rule["filters"] == [
        {
            "type": "RequestMirror",
            "requestMirror": {
                "backendRef": {"group": "", "kind": "Service", "name": "t-optiserve-mlp-ov-d2", "port": 3000}
            },
        }
    ]
    assert [b["name"] for b in rule["backendRefs"]] == ["t-optiserve-mlp-onnx-a1"]
    (vs,) = by_kind(objects, "VirtualService")
    assert vs["spec"]["http"][0]["mirror"]["host"] == "t-optiserve-mlp-ov-d2.ml.svc.cluster.local"
    assert vs["spec"]["http"][0]["mirrorPercentage"] == {"value": 100.0}


def test_loadgen_runs_the_project_locustfile(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["loadgen"]
    jobs = {j["metadata"]["name"]: j for j in by_kind(objects, "Job")}
    master, worker = jobs["t-optiserve-loadgen-master"], jobs["t-optiserve-loadgen-worker"]
    assert worker["spec"]["parallelism"] == worker["spec"]["completions"] == 3
    script = master["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "import optiserve.loadtests" in script and "locustfile.py" in script
    assert "--master" in script and "--expect-workers 3" in script and "--csv /results/locust" in script
    assert "--host http://t-optiserve-mlp-onnx-a1:3000" in script
    assert (
        "--master-host t-optiserve-loadgen-master"
        in worker["spec"]["template"]["spec"]["containers"][0]["args"][0]
    )
    env = {e["name"]: e["value"] for e in master["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OPTISERVE_PATH"] == "/v2/models/mlp/infer"
    payloads = next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("loadgen"))
    assert payloads["data"]["payloads.jsonl"] == PAYLOAD
    policy = by_kind(objects, "NetworkPolicy")[0]["spec"]["ingress"][0]["from"]
    assert any(
        p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "loadgen"
        for p in policy
    )


def test_monitoring_uses_the_metrics_contract(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["monitoring"]
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    scraped = [
        s
        for s in by_kind(objects, "Service")
        if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert len(scraped) == 2  # the variants' Services, not the entry Service (no double scrape)
    (rule,) = by_kind(objects, "PrometheusRule")
    exprs, recorded = rule_queries(rule)
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"OptiserveHighErrorRate", "OptiserveP99AboveSLO", "OptiserveLatencySLOBurn"} <= alerts
    assert any("optiserve_errors_total" in e and "optiserve_requests_total" in e for e in exprs)
    assert any("histogram_quantile" in e and "optiserve_request_duration_seconds_bucket" in e for e in exprs)
    for expr in exprs:
        assert check_promql(expr, recorded) == [], expr
    (dashboard,) = [
        c for c in by_kind(objects, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    queries = dashboard_queries(dashboard)
    titles = " ".join(p["title"] for p in json.loads(next(iter(dashboard["data"].values())))["panels"])
    for word in ("p50", "p99", "Throughput", "batch size", "Errors"):
        assert word in titles
    for query in queries:
        assert check_promql(query) == [], query


def test_slo_threshold_is_a_histogram_bucket() -> None:
    """The burn-rate rule selects le="<p99Seconds>": that must be a bucket the service exports."""
    import yaml

    from optiserve.metrics import LATENCY_BUCKETS_S

    slo = yaml.safe_load((CHART / "values.yaml").read_text())["monitoring"]["slo"]["p99Seconds"]
    assert slo in LATENCY_BUCKETS_S


def test_promql_checker_rejects_unknown_names() -> None:
    assert check_promql('sum by (variant) (rate(optiserve_requests_total{code="500"}[5m]))') == []
    assert check_promql("rate(http_requests_total[5m])") == ["unknown metric http_requests_total"]
    assert check_promql('sum by (instance) (optiserve_ready{model="m"})') == ["unknown label instance"]
    assert check_promql('rate(optiserve_errors_total{protocol="oip"}[1m])') == ["unknown label protocol"]


def test_artifact_delivery(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployments = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in by_kind(rendered["artifact-url"], "Deployment")
    }
    images = {}
    for name, pod in deployments.items():
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
        assert mount["mountPath"].startswith("/home/bentoml/bento/src/model/") and mount["readOnly"]
        if "pvc" in name:
            assert "initContainers" not in pod
            assert pod["volumes"][-1]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
            continue
        (init,) = pod["initContainers"]
        images[name] = init["image"]
        assert {"name": "model", "mountPath": "/model"} in init["volumeMounts"]
        assert {"name": "model", "emptyDir": {"sizeLimit": "10Gi"}} in pod["volumes"]
    assert images["t-optiserve-mlp-http-e1"].startswith("curlimages/curl:")
    assert images["t-optiserve-mlp-s3-e2"].startswith("amazon/aws-cli:")
    assert images["t-optiserve-mlp-oci-e3"].startswith("ghcr.io/oras-project/oras:")


def test_autoscaling_and_spec_override(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["autoscaling-and-spec"]
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "optiserve_requests_per_second"},
                "target": {"type": "AverageValue", "averageValue": "50"},
            },
        }
    ]
    (dep,) = by_kind(objects, "Deployment")
    assert "replicas" not in dep["spec"]  # the HPA owns it
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OPTISERVE_SERVICE_SPEC"] == "/etc/optiserve/service.json"
    spec_cm = next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-spec"))
    spec = json.loads(spec_cm["data"]["service.json"])
    assert spec["variant_dir"] == "/home/bentoml/bento/src/model/mlp.onnx.a1" and "port" not in spec
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]


# --- refused values ---------------------------------------------------------------------------------------

BAD: dict[str, tuple[dict[str, Any], str, bool]] = {
    # name: (values, what the error names, whether the schema catches it (so `helm lint` fails too))
    "negative-replicas": ({"variants": [variant("a-x", replicas=-1)]}, "/variants/0/replicas", True),
    "unknown-runtime": ({"variants": [variant("a-x", "tflite")]}, "/variants/0/runtime", True),
    "unknown-variant-key": ({"variants": [variant("a-x", replica=2)]}, "'replica' not allowed", True),
    "unknown-top-key": ({"variants": [], "monitorin": {"enabled": True}}, "'monitorin' not allowed", True),
    "bad-name": ({"variants": [variant("A_x")]}, "/variants/0/name", True),
    "weights-sum": (
        {"variants": [variant("a-x"), variant("b-x")], "traffic": {"weights": {"a-x": 60, "b-x": 30}}},
        "traffic.weights: the weights must sum to 100, they sum to 90",
        False,
    ),
    "weights-unknown-variant": (
        {"variants": [variant("a-x")], "traffic": {"weights": {"a-x": 50, "zz": 50}}},
        "traffic.weights.zz: no variant is named",
        False,
    ),
    "mirror-unknown": ({"variants": [variant("a-x")], "traffic": {"mirror": "zz"}}, "traffic.mirror", False),
    "tensorrt-without-gpu": ({"variants": [variant("a-x", "tensorrt")]}, "variants[0].gpu", False),
    "url-without-url": (
        {"variants": [variant("a-x", artifact={"source": "url"})]},
        "variants[0].artifact.url",
        False,
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_refused(helm: Path, tmp_path: Path, case: str) -> None:
    values, named, in_schema = BAD[case]
    done = helm_run(helm, "template", "t", CHART, values=values, tmp=tmp_path)
    assert done.returncode != 0
    assert named in done.stderr, done.stderr
    linted = helm_run(helm, "lint", "--strict", CHART, values=values, tmp=tmp_path)
    if in_schema:
        assert linted.returncode != 0 and named in linted.stdout + linted.stderr
    else:
        # helm lint renders `fail` as a log line, not a failure (it lints in "lint mode"); install fails.
        assert named in linted.stderr


# --- the helm binary ----------------------------------------------------------------------------------------


def test_find_helm_extracts_the_bundled_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.metadata as md
    import subprocess

    from optiserve.deploy import helm as helm_mod

    try:
        md.distribution(helm_mod.HELM_DIST)
    except md.PackageNotFoundError:
        from tests.deploy.conftest import unavailable

        unavailable(f"{helm_mod.HELM_DIST} is not installed")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("OPTISERVE_CACHE", str(tmp_path / "cache"))
    found = helm_mod.find_helm()
    assert found.is_relative_to(tmp_path / "cache" / "helm")
    assert found.stat().st_mode & stat.S_IXUSR
    version = subprocess.run([str(found), "version", "--short"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("v")
    assert helm_mod.find_helm() == found  # cached: not extracted again
    mtime = found.stat().st_mtime_ns
    assert helm_mod.find_helm().stat().st_mtime_ns == mtime


def test_find_helm_without_any_helm_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from optiserve.deploy import helm as helm_mod
    from optiserve.errors import PluginUnavailable

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(helm_mod, "HELM_DIST", "optiserve-no-such-distribution")
    with pytest.raises(PluginUnavailable) as e:
        helm_mod.find_helm()
    line = e.value.one_line()
    assert "\n" not in line and "helm is not available" in line and "optiserve[deploy]" in line
    assert os.environ["PATH"] == str(tmp_path / "empty")
