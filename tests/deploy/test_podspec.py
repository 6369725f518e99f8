"""One source of pod settings: the docker target's `docker run` options come from the chart that the real
helm renders, field by field; INT8 variants are pinned to nodes with the CPU features they were tuned
for (node-feature-discovery labels)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from optiserve.deploy import k8s
from optiserve.deploy.podspec import docker_run_args, quantity_bytes, quantity_cpus, rendered_pod
from optiserve.errors import ConfigError
from optiserve.types import ServiceSpec, ThreadSpec, Variant
from tests.conftest import service_spec
from tests.deploy.conftest import template, validate_object


def option(args: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (``--flag value`` or ``--flag=value``)."""
    values = [args[i + 1] for i, a in enumerate(args) if a == flag]
    return values + [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]


@pytest.fixture
def spec(onnx_source: Variant, variants_workdir: Path) -> ServiceSpec:
    return service_spec(onnx_source, variants_workdir, "onnxruntime")


def test_docker_options_are_the_rendered_pods(helm: Path, spec: ServiceSpec, tmp_path: Path) -> None:
    pod = rendered_pod(spec, tmp_path)
    args = docker_run_args(pod, tmp_path / "files")
    assert option(args, "--user") == ["1034:1034"]
    assert "--read-only" in args
    assert option(args, "--cap-drop") == ["ALL"]
    assert option(args, "--security-opt") == ["no-new-privileges"]
    assert "--privileged" not in args
    tmpfs = dict(t.split(":", 1) for t in option(args, "--tmpfs"))
    assert set(tmpfs) == {"/tmp", "/var/lib/bentoml"}
    assert f"size={2**30}" in tmpfs["/tmp"]  # the chart's emptyDir sizeLimit: 1Gi
    assert option(args, "--cpus") == ["1.5"]  # 1 thread + half a core, as resources_for sizes it
    limit = pod.container["resources"]["limits"]["memory"]
    assert option(args, "--memory") == [str(quantity_bytes(limit))]
    env = dict(e.split("=", 1) for e in option(args, "--env"))
    assert env["BENTOML_PORT"] == "3000" and env["BENTOML_HOME"] == "/var/lib/bentoml"
    assert option(args, "--stop-timeout") == ["30"]
    assert pod.image == f"{spec.variant.id}:onnxruntime"
    assert pod.probe_path("readinessProbe") == "/v2/health/ready"


def test_chart_values_change_the_docker_options(helm: Path, spec: ServiceSpec, tmp_path: Path) -> None:
    """The chart is the one source: a value changed there changes what docker runs."""
    sets = (
        "podSecurity.runAsUser=2000",
        "variants[0].terminationGracePeriodSeconds=7",
        "variants[0].env.EXTRA=1",
    )
    args = docker_run_args(rendered_pod(spec, tmp_path, sets), tmp_path / "files")
    assert option(args, "--user") == ["2000:1034"]
    assert option(args, "--stop-timeout") == ["7"]
    assert "EXTRA=1" in option(args, "--env")


@pytest.mark.parametrize("host", [2, 4])
def test_threads_size_the_cpu_limit(
    helm: Path,
    spec: ServiceSpec,
    tmp_path: Path,
    host: int,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wider = rendered_pod(spec.model_copy(update={"threads": ThreadSpec(intra_op=2)}), tmp_path)
    assert wider.container["resources"]["limits"]["cpu"] == "2500m"
    # docker refuses a limit above the machine's CPUs: capped there, and said so
    monkeypatch.setattr(os, "cpu_count", lambda: host)
    with caplog.at_level("WARNING"):
        args = docker_run_args(wider, tmp_path / "f")
    assert option(args, "--cpus") == [f"{min(2.5, host):g}"]
    capped = [r.getMessage() for r in caplog.records if "--cpus" in r.getMessage()]
    said = (
        "the pod's CPU limit is 2.5 but this machine has 2 CPUs: docker runs it with --cpus 2 "
        "(on a node the chart's limit applies)"
    )
    assert capped == ([said] if host == 2 else [])


def test_replicas_are_pods_on_a_cluster_and_workers_of_one_container_in_docker(
    helm: Path, spec: ServiceSpec, tmp_path: Path
) -> None:
    three = spec.model_copy(update={"replicas": 3})
    (pods,) = k8s.build_values([three], repository="r")["variants"]
    assert pods["replicas"] == 3 and pods["resources"] == k8s.resources_for(spec)
    assert "serviceSpec" not in pods  # each pod serves the Bento's own spec: one worker
    objects = template(helm, k8s.build_values([three], repository="r"), tmp_path)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 3
    (one_pod,) = k8s.build_values([three], repository="r", replicas_as="workers")["variants"]
    assert one_pod["replicas"] == 1 and one_pod["serviceSpec"]["replicas"] == 3
    # docker runs that one pod: three workers' CPU (1.5 each) in the one container, as far as the
    # machine has it (docker refuses more)
    pod = rendered_pod(three, tmp_path)
    assert pod.container["resources"]["limits"]["cpu"] == "4500m"
    expected = f"{min(4.5, os.cpu_count() or 1):g}"
    assert option(docker_run_args(pod, tmp_path / "f"), "--cpus") == [expected]
    (served,) = [json.loads(m["service.json"]) for m in pod.config_maps.values() if "service.json" in m]
    assert served["replicas"] == 3


def test_service_spec_override_is_mounted_read_only(helm: Path, spec: ServiceSpec, tmp_path: Path) -> None:
    served = spec.model_copy(update={"threads": ThreadSpec(intra_op=2)})
    pod = rendered_pod(spec, tmp_path)
    pod.spec["volumes"].append({"name": "service-spec", "configMap": {"name": "x-spec"}})
    pod.container["volumeMounts"].append({"name": "service-spec", "mountPath": "/etc/optiserve"})
    pod.config_maps["x-spec"] = {"service.json": served.model_dump_json()}
    args = docker_run_args(pod, tmp_path / "files")
    (mount,) = option(args, "--mount")
    assert mount.endswith("target=/etc/optiserve,readonly")
    assert (tmp_path / "files" / "x-spec" / "service.json").read_text() == served.model_dump_json()


def test_a_volume_docker_cannot_mount_is_an_error(helm: Path, spec: ServiceSpec, tmp_path: Path) -> None:
    sets = ("variants[0].artifact.source=pvc", "variants[0].artifact.claimName=models")
    with pytest.raises(ConfigError, match="cannot mount volume 'model'"):
        docker_run_args(rendered_pod(spec, tmp_path, sets), tmp_path / "files")


@pytest.mark.parametrize(
    ("text", "expected"), [("1280Mi", 1280 * 2**20), ("1Gi", 2**30), ("512M", 512_000_000), ("1000", 1000)]
)
def test_memory_quantities(text: str, expected: int) -> None:
    assert quantity_bytes(text) == expected


def test_cpu_quantities() -> None:
    assert quantity_cpus("1500m") == 1.5 and quantity_cpus("2") == 2.0 and quantity_cpus(0.5) == 0.5
    with pytest.raises(ConfigError):
        quantity_bytes("lots")


# --- CPU features of INT8 variants → node-feature-discovery ----------------------------------------------


def int8(spec: ServiceSpec, features: tuple[str, ...] | None) -> ServiceSpec:
    variant = spec.variant.model_copy(update={"precision": "int8", "cpu_features": features})
    return spec.model_copy(update={"variant": variant})


def required_features(objects: list[dict[str, Any]]) -> list[str] | None:
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    affinity = deployment["spec"]["template"]["spec"].get("affinity", {})
    node = affinity.get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if node is None:
        return None
    return [t["matchExpressions"][0]["key"] for t in node["nodeSelectorTerms"]]


NFD = "feature.node.kubernetes.io/cpu-cpuid."


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        (
            ("avx2", "avx512_vnni"),
            ["AVX512VNNI", "AVXVNNI", "AMXINT8"],
        ),  # tuned with VNNI: any VNNI-class node
        (("avx2",), ["AVX2"]),  # tuned without (7-bit weights): runs right anywhere with AVX2
        (None, None),  # float: no rule
    ],
)
def test_int8_variants_are_pinned_to_matching_nodes(
    helm: Path, kube_validate: Any, spec: ServiceSpec, tmp_path: Path, features: Any, expected: Any
) -> None:
    values = k8s.build_values([int8(spec, features)], repository="registry.example/ml")
    objects = template(helm, values, tmp_path)
    got = required_features(objects)
    assert got == (None if expected is None else [NFD + f for f in expected])
    for obj in objects:
        validate_object(kube_validate, obj)


def test_node_feature_pinning_can_be_overridden(helm: Path, spec: ServiceSpec, tmp_path: Path) -> None:
    values = k8s.build_values([int8(spec, ("avx512_vnni",))], repository="")
    assert (
        required_features(
            template(helm, {**values, "nodeFeatures": {"enabled": False, "labelPrefix": NFD}}, tmp_path)
        )
        is None
    )
    own = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    values["variants"][0]["affinity"] = own
    (deployment,) = [o for o in template(helm, values, tmp_path) if o["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["affinity"] == own  # the user's own rule wins
