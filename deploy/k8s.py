"""Kubernetes deployment with the ``helm/optiserve`` chart: values from the servable variants, ``helm
template`` to files, ``helm upgrade --install`` / ``helm uninstall`` against a cluster.

The values name each (variant, runtime) pair's Bento image by the Bento tag convention: image
``<repository>/<variant id>:<runtime>``, the model baked in. Resources follow the ServiceSpec's threads
(CPU requests equal limits, so an A/B pair gets the same CPU), memory the artifact's size, and a GPU is
requested where the runtime or its options need CUDA. The ServiceSpec inside the Bento is served as is;
the chart overrides it (``serviceSpec`` → a ConfigMap and ``OPTISERVE_SERVICE_SPEC``) only where the
Bento in the local BentoML store was built with other serving settings than the current config's.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optiserve.errors import ConfigError, OptiserveError, ServingError
from optiserve.types import ServiceSpec

NAME_MAX = 40
"""Variant names stay short: the chart prefixes them with the release name (63 characters in all)."""
PAYLOAD_BUDGET = 256 * 1024
"""Load-generator payloads travel in the values and a ConfigMap, and Helm stores both in its release
Secret (at most 1 MiB, compressed): requests beyond this many bytes are left out."""
SERVING_FIELDS = ("batching", "threads", "limits", "runtime_options", "access_log", "tracing")
"""The ServiceSpec fields a deployment may change without rebuilding the Bento."""
GPU_OPTIONS = {"execution_provider": ("cuda", "tensorrt"), "device": ("cuda", "gpu")}


@dataclass(frozen=True)
class Target:
    """Where a release goes."""

    release: str = "optiserve"
    namespace: str = "default"


@dataclass(frozen=True)
class ServedEndpoint:
    variant_id: str
    runtime: str
    url: str


# --- values ------------------------------------------------------------------------------------------


def dns_label(text: str, max_len: int = NAME_MAX) -> str:
    """A DNS label from a variant id (``effnet.onnx.c57e0c`` → ``effnet-onnx-c57e0c``); too long a name
    keeps its start and gets a hash of the whole, so names stay unique."""
    label = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "variant"
    if len(label) <= max_len:
        return label
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{label[: max_len - 7].rstrip('-')}-{digest}"


def pair_name(spec: ServiceSpec, multi_runtime: bool) -> str:
    """The chart's name of a pair: the variant id, plus the runtime where the variant has several."""
    return dns_label(f"{spec.variant.id}-{spec.runtime}" if multi_runtime else spec.variant.id)


def image_of(repository: str, spec: ServiceSpec) -> dict[str, str]:
    """``<repository>/<variant id>:<runtime>``: the Bento tag, as ``bentoml containerize`` names it."""
    repo = f"{repository.rstrip('/')}/{spec.variant.id}" if repository else spec.variant.id
    return {"repository": repo, "tag": spec.runtime}


def gpu_resource(spec: ServiceSpec) -> tuple[int, str | None]:
    """(GPUs, resource name) a pair needs: TensorRT, or a runtime option asking for CUDA or a GPU."""
    from optiserve.services.runtimes.base import Runtime

    try:
        needs_cuda = bool(getattr(Runtime.get(spec.runtime), "needs_cuda", False))
    except OptiserveError:
        needs_cuda = spec.runtime == "tensorrt"
    if needs_cuda:
        return 1, "nvidia.com/gpu"
    for key, wanted in GPU_OPTIONS.items():
        value = str(spec.runtime_options.get(key, "")).lower()
        if value in wanted:
            # OpenVINO's GPU plugin drives Intel GPUs; every CUDA path wants an NVIDIA one.
            intel = spec.runtime == "openvino" and value == "gpu"
            return 1, "gpu.intel.com/i915" if intel else "nvidia.com/gpu"
    return 0, None


def resources_for(spec: ServiceSpec, workers: int = 1) -> dict[str, dict[str, str]]:
    """CPU from the threads (+ half a core for BentoML's HTTP worker and the batcher; requests equal
    limits), memory 512 MiB + 4x the artifact (runtime copies, arena, batch buffers), limit twice that;
    each times the pod's worker processes."""
    cores = (spec.threads.intra_op * max(1, spec.threads.streams) + 0.5) * workers
    cpu = f"{int(cores * 1000)}m"
    request_mib = (512 + 4 * spec.variant.size_bytes / 2**20) * workers
    request_mib = int(math.ceil(request_mib / 64) * 64)
    return {
        "requests": {"cpu": cpu, "memory": f"{request_mib}Mi"},
        "limits": {"cpu": cpu, "memory": f"{2 * request_mib}Mi"},
    }


def spec_override(spec: ServiceSpec, baked: ServiceSpec | None, workers: int = 1) -> dict[str, Any]:
    """The ServiceSpec the chart should serve instead of the Bento's, or {} when the Bento's will do;
    ``workers``: the worker processes each pod runs (its ``replicas``: the Bento's is 1)."""
    same = baked is not None and all(getattr(spec, f) == getattr(baked, f) for f in SERVING_FIELDS)
    if workers == 1 and (baked is None or same):
        return {}
    data: dict[str, Any] = spec.model_dump(mode="json")
    data.pop("port", None)
    data["replicas"] = workers
    return data


def baked_spec(spec: ServiceSpec) -> ServiceSpec | None:
    """The ServiceSpec inside the Bento ``<variant id>:<runtime>`` of the local store, if it is there."""
    try:
        import bentoml

        from optiserve.deploy.bento import SPEC_IN_BENTO
        from optiserve.manifest import read_model

        bento = bentoml.bentos.get(f"{spec.variant.id}:{spec.runtime}")
        return read_model(Path(bento.path) / "src" / SPEC_IN_BENTO, ServiceSpec)
    except Exception:  # no bentoml, no such Bento, or an unreadable one: serve the image's own spec
        return None


VNNI_CLASS = ("avx512_vnni", "avx_vnni", "amx_int8")
"""CPU features whose INT8 dot products accumulate in int32 (no u8×s8 saturation)."""
NFD_NAMES = {"avx2": "AVX2", "avx512_vnni": "AVX512VNNI", "avx_vnni": "AVXVNNI", "amx_int8": "AMXINT8"}
"""/proc/cpuinfo flag → node-feature-discovery's ``feature.node.kubernetes.io/cpu-cpuid.<NAME>`` label."""


def node_cpu_features(spec: ServiceSpec) -> list[str]:
    """The NFD CPU features a node needs (any one of them) to run an INT8 variant as it was tuned.

    Tuned on a VNNI-class CPU (full 8-bit weights): a node without one saturates its u8×s8 products and
    loses accuracy, so any VNNI-class feature is required. Tuned without (7-bit weights): it runs right
    everywhere; AVX2, what it was tuned for, is required. Float variants: nothing."""
    tuned = spec.variant.cpu_features
    if not tuned:
        return []
    if any(f in VNNI_CLASS for f in tuned):
        return [NFD_NAMES[f] for f in VNNI_CLASS]
    return [NFD_NAMES[f] for f in tuned if f in NFD_NAMES]


def variant_values(
    spec: ServiceSpec,
    name: str,
    repository: str,
    baked: ServiceSpec | None = None,
    replicas_as: Literal["pods", "workers"] = "pods",
) -> dict[str, Any]:
    """One entry of the chart's ``variants:``. ``spec.replicas`` become pods of one worker each (a
    cluster), or worker processes of one pod (``workers``: the docker target, one machine)."""
    gpus, gpu_name = gpu_resource(spec)
    workers = spec.replicas if replicas_as == "workers" else 1
    entry: dict[str, Any] = {
        "name": name,
        "variantId": spec.variant.id,
        "model": spec.variant.model.name,
        "runtime": spec.runtime,
        "precision": spec.variant.precision,
        "image": image_of(repository, spec),
        "resources": resources_for(spec, workers),
        "replicas": 1 if replicas_as == "workers" else spec.replicas,
    }
    if gpus:
        entry["gpu"] = gpus
        entry["gpuResource"] = gpu_name
    features = node_cpu_features(spec)
    if features:
        entry["cpuFeatures"] = features
    override = spec_override(spec, baked, workers)
    if override:
        entry["serviceSpec"] = override
    return entry


def parse_weights(text: str | None) -> dict[str, int]:
    """``id=90,id2=10`` → ``{"id": 90, "id2": 10}`` (keys: variant ids, ``id@runtime``, or chart names)."""
    if not text:
        return {}
    weights: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise ConfigError(f"--weights takes id=weight pairs, e.g. a=90,b=10 (got {part!r})")
        weights[key.strip()] = int(value)
    if sum(weights.values()) != 100:
        raise ConfigError(f"--weights must sum to 100, they sum to {sum(weights.values())} ({text})")
    return weights


def resolve_weights(weights: Mapping[str, int], entries: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Weights keyed by the chart's variant names; a variant id with several runtimes needs ``id@runtime``."""
    by_key: dict[str, list[str]] = {}
    for e in entries:
        for key in (e["name"], e["variantId"], f"{e['variantId']}@{e['runtime']}"):
            by_key.setdefault(key, []).append(e["name"])
    resolved: dict[str, int] = {}
    for key, weight in weights.items():
        names = sorted(set(by_key.get(key, [])))
        if not names:
            known = ", ".join(e["variantId"] for e in entries)
            raise ConfigError(f"--weights: {key!r} is not a deployed variant (deployed: {known})")
        if len(names) > 1:
            raise ConfigError(f"--weights: {key!r} is served by several runtimes; use {key}@RUNTIME")
        resolved[names[0]] = weight
    return resolved


def loadgen_payloads(requests: Iterable[str], budget: int = PAYLOAD_BUDGET) -> str:
    """As many payload lines as fit the budget; "" when even one does not (an image model's raw
    tensor): then the load generator needs payloads given by hand (``loadgen.payloads``)."""
    kept: list[str] = []
    size = 0
    for line in requests:
        if size + len(line) + 1 > budget:
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(kept)


def build_values(
    specs: Sequence[ServiceSpec],
    *,
    repository: str,
    weights: Mapping[str, int] | None = None,
    payloads: str = "",
    baked: Mapping[tuple[str, str], ServiceSpec | None] | None = None,
    replicas_as: Literal["pods", "workers"] = "pods",
) -> dict[str, Any]:
    """The chart's values for these pairs: variants, A/B weights and the load generator's target."""
    runtimes_per_variant: dict[str, int] = {}
    for s in specs:
        runtimes_per_variant[s.variant.id] = runtimes_per_variant.get(s.variant.id, 0) + 1
    entries = []
    for s in specs:
        name = pair_name(s, runtimes_per_variant[s.variant.id] > 1)
        baked_one = (baked or {}).get((s.variant.id, s.runtime))
        entries.append(variant_values(s, name, repository, baked_one, replicas_as))
    values: dict[str, Any] = {"variants": entries}
    if weights:
        values["traffic"] = {"weights": resolve_weights(weights, entries)}
    if entries:
        values["loadgen"] = {"enabled": False, "target": entries[0]["name"], "payloads": payloads}
    return values


def apply_sets(values: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``--set a.b=value`` and ``--set variants[0].replicas=2`` (the value parsed as YAML: numbers,
    booleans, lists) into the values, as helm's ``--set`` would."""
    import yaml

    for item in sets:
        key, sep, raw = item.partition("=")
        steps = _set_path(key)
        if not sep or not steps:
            raise ConfigError(
                f"--set takes KEY=VALUE with a dotted key, e.g. monitoring.enabled=true (got {item!r})"
            )
        node: Any = values
        for step in steps[:-1]:
            node = _set_step(node, step, item)
        last = steps[-1]
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(last, int) and (not isinstance(node, list) or last >= len(node)):
            raise ConfigError(f"--set {item}: index {last} is out of range")
        node[last] = value
    return values


def _set_path(key: str) -> list[str | int]:
    """``variants[0].replicas`` → ``["variants", 0, "replicas"]``."""
    steps: list[str | int] = []
    for part in (p for p in key.strip().split(".") if p):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if m is None:
            return []
        steps.append(m.group(1))
        steps += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return steps


def _set_step(node: Any, step: str | int, item: str) -> Any:
    if isinstance(step, int):
        if not isinstance(node, list) or step >= len(node):
            raise ConfigError(f"--set {item}: index {step} is out of range")
        return node[step]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {item}: {step} is not inside a mapping")
    return node.setdefault(step, {})


def read_values(path: Path) -> dict[str, Any]:
    """Chart values from a YAML file (as `optiserve tune` writes them); one line when it is not one."""
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--values {path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--values {path}: not YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(values, dict) or not isinstance(values.get("variants"), list) or not values["variants"]:
        raise ConfigError(f"--values {path}: expected chart values with a non-empty `variants:` list")
    return values


def write_values(values: Mapping[str, Any], path: Path) -> Path:
    import yaml

    from optiserve.fsutil import atomic_write_text

    class Dumper(yaml.SafeDumper):
        """Multi-line strings (the load generator's payloads) as literal blocks, one request a line."""

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)

    Dumper.add_representer(str, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `optiserve deploy`: values for helm/optiserve (see helm/README.md).\n"
    body = yaml.dump(dict(values), Dumper=Dumper, sort_keys=False, width=120)
    atomic_write_text(path, header + body)
    return path


# --- helm -------------------------------------------------------------------------------------------------


def chart_dir() -> Path:
    """The chart: ``$OPTISERVE_CHART``, else ``helm/optiserve`` of this checkout."""
    chart = Path(
        os.environ.get("OPTISERVE_CHART") or Path(__file__).resolve().parents[1] / "helm" / "optiserve"
    )
    if not (chart / "Chart.yaml").is_file():
        raise ConfigError(
            f"no Helm chart at {chart}", hint="set OPTISERVE_CHART to the helm/optiserve folder"
        )
    return chart


def _helm(
    args: Sequence[str], *, timeout: float, what: str, error: type[OptiserveError] = ServingError
) -> str:
    """Run helm; its failure becomes one line (helm's error lines) naming what was attempted."""
    from optiserve.deploy.helm import find_helm

    cmd = [str(find_helm()), *args]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ServingError(f"{what} timed out after {timeout:.0f}s") from e
    if result.returncode != 0:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("Error") or ln.startswith("- at")] or lines
        raise error(f"{what} failed: {' '.join(errors[-2:])[:400] or f'exit {result.returncode}'}")
    return result.stdout


def render(values_path: Path, target: Target, chart: Path | None = None) -> list[dict[str, Any]]:
    """``helm template``: the chart's objects for these values, parsed (no cluster needed)."""
    import yaml

    text = _helm(
        [
            "template",
            target.release,
            str(chart or chart_dir()),
            "--namespace",
            target.namespace,
            "-f",
            str(values_path),
        ],
        timeout=120,
        what="helm template",
        error=ConfigError,  # the chart is fixed: what fails to render is the values
    )
    return [doc for doc in yaml.safe_load_all(text) if doc]


def write_manifests(objects: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """One file per object: ``<nn>-<kind>-<name>.yaml`` (the old ones of a previous render removed)."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("[0-9][0-9]-*.yaml"):
        old.unlink()
    paths = []
    for i, obj in enumerate(objects):
        kind = str(obj.get("kind", "object")).lower()
        name = str(obj.get("metadata", {}).get("name", "unnamed"))
        path = out_dir / f"{i:02d}-{kind}-{name}.yaml"
        path.write_text(yaml.safe_dump(dict(obj), sort_keys=False, width=120))
        paths.append(path)
    return paths


def cluster_problem(timeout_s: float = 15) -> str | None:
    """Why no cluster can be reached (None when one answers): ``kubectl cluster-info``'s first error."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "kubectl is not on PATH"
    try:
        result = subprocess.run(
            [kubectl, "cluster-info", f"--request-timeout={int(timeout_s)}s"],
            capture_output=True,
            text=True,
            timeout=timeout_s + 10,
        )
    except subprocess.TimeoutExpired:
        return f"kubectl cluster-info did not answer in {timeout_s:.0f}s"
    if result.returncode == 0:
        return None
    return f"kubectl cluster-info failed: {_kubectl_reason(result.stderr or result.stdout)}"


def _kubectl_reason(text: str) -> str:
    """kubectl's own summary line (its klog lines, ``E1125 16:20:04 ...``, repeat the details)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("To further debug")]
    plain = [ln for ln in lines if not re.match(r"^[EIWF]\d{4} ", ln)]
    return ((plain or lines or ["no output"])[-1])[:200]


def require_cluster() -> None:
    problem = cluster_problem()
    if problem:
        raise ServingError(
            f"no Kubernetes cluster is reachable ({problem})",
            hint="check the kubeconfig context, or use --render DIR to write the manifests without a cluster",
        )


def install(values_path: Path, target: Target, *, dry_run: bool, wait_timeout_s: float) -> str:
    """``helm upgrade --install`` and, unless a dry run, wait until every Deployment is rolled out."""
    args = [
        "upgrade",
        "--install",
        target.release,
        str(chart_dir()),
        "--namespace",
        target.namespace,
        "--create-namespace",
        "-f",
        str(values_path),
    ]
    if dry_run:
        args.append("--dry-run=server")
    else:
        args += ["--wait", "--timeout", f"{int(wait_timeout_s)}s"]
    return _helm(args, timeout=wait_timeout_s + 60, what=f"helm upgrade --install {target.release}")


def uninstall(target: Target, *, wait_timeout_s: float = 300) -> str:
    return _helm(
        [
            "uninstall",
            target.release,
            "--namespace",
            target.namespace,
            "--wait",
            "--timeout",
            f"{int(wait_timeout_s)}s",
        ],
        timeout=wait_timeout_s + 60,
        what=f"helm uninstall {target.release}",
    )


def endpoints(objects: Sequence[Mapping[str, Any]], namespace: str) -> list[ServedEndpoint]:
    """The in-cluster URL of each variant's Service, from the rendered objects."""
    found = []
    for obj in objects:
        labels = obj.get("metadata", {}).get("labels", {})
        if obj.get("kind") != "Service" or labels.get("app.kubernetes.io/component") != "server":
            continue
        port = obj["spec"]["ports"][0]["port"]
        url = f"http://{obj['metadata']['name']}.{namespace}.svc:{port}"
        found.append(ServedEndpoint(labels["optiserve.io/variant"], labels["optiserve.io/runtime"], url))
    return found
