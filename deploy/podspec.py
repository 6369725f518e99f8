"""The chart's pod, as ``docker run`` arguments: one source of pod settings for Kubernetes and docker.

:func:`rendered_pod` renders the real chart (``helm template``) with the values ``optiserve deploy``
would write for one ServiceSpec and takes the server Deployment's pod template. :func:`docker_run_args`
translates it field by field: user and group, read-only root filesystem, dropped capabilities, no
privilege escalation, seccomp, emptyDirs as tmpfs mounts of their size limit, ConfigMap volumes as
read-only files, CPU and memory limits, env, ports, the grace period. A field it cannot honour is an
error, never silently dropped, so a container started this way runs as the cluster would run the pod.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optiserve.errors import ConfigError
from optiserve.types import ServiceSpec

from . import k8s

LOG = logging.getLogger(__name__)

RELEASE = "optiserve"
NAMESPACE = "default"


@dataclass
class RenderedPod:
    """The pod template of one variant's Deployment, and the ConfigMaps its volumes name."""

    spec: dict[str, Any]
    labels: dict[str, str]
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def container(self) -> dict[str, Any]:
        return next(c for c in self.spec["containers"] if c["name"] == "server")

    @property
    def image(self) -> str:
        return str(self.container["image"])

    @property
    def container_port(self) -> int:
        return int(self.container["ports"][0]["containerPort"])

    def probe_path(self, probe: str) -> str:
        """``readinessProbe`` / ``livenessProbe``'s HTTP path."""
        return str(self.container.get(probe, {}).get("httpGet", {}).get("path", "/readyz"))


def rendered_pod(spec: ServiceSpec, values_dir: Path, sets: tuple[str, ...] = ()) -> RenderedPod:
    """``helm template`` of the chart with ``spec`` as its only variant; the server pod it renders, with
    ``spec.replicas`` as worker processes of that one pod (one machine)."""
    values = k8s.build_values(
        [spec],
        repository="",
        baked={(spec.variant.id, spec.runtime): k8s.baked_spec(spec)},
        replicas_as="workers",
    )
    k8s.apply_sets(values, list(sets))
    values_path = k8s.write_values(values, values_dir / "values.yaml")
    objects = k8s.render(values_path, k8s.Target(release=RELEASE, namespace=NAMESPACE))
    deployments = [o for o in objects if o.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise ConfigError(f"the chart rendered {len(deployments)} Deployments for one variant (expected 1)")
    template = deployments[0]["spec"]["template"]
    config_maps = {
        o["metadata"]["name"]: {k: str(v) for k, v in (o.get("data") or {}).items()}
        for o in objects
        if o.get("kind") == "ConfigMap"
    }
    return RenderedPod(template["spec"], dict(template["metadata"].get("labels", {})), config_maps)


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (``1280Mi``, ``1Gi``, ``512M``, ``1000``) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]i?|[kmgtp])?", str(text).strip())
    if m is None:
        raise ConfigError(f"memory quantity {text!r} is not of the form 512Mi / 1Gi / 1000")
    units = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
    unit = m.group(2) or ""
    factor = binary.get(unit) or units.get(unit) or units[unit.upper()]
    return int(float(m.group(1)) * factor)


def quantity_cpus(text: str | int | float) -> float:
    """A Kubernetes CPU quantity (``1500m``, ``2``, ``0.5``) in cores."""
    raw = str(text).strip()
    return float(raw[:-1]) / 1000 if raw.endswith("m") else float(raw)


def docker_run_args(pod: RenderedPod, files_dir: Path) -> list[str]:
    """``docker run`` options equivalent to the pod's server container (no image, no name, no port)."""
    spec, c = pod.spec, pod.container
    pod_sec = spec.get("securityContext", {})
    sec = {**pod_sec, **c.get("securityContext", {})}
    unsupported = [k for k in ("initContainers", "hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    if unsupported:
        raise ConfigError(f"the docker target cannot run a pod with {', '.join(unsupported)}")
    args: list[str] = []
    if "runAsUser" in sec:
        user = str(sec["runAsUser"])
        args += ["--user", f"{user}:{sec['runAsGroup']}" if "runAsGroup" in sec else user]
    if sec.get("runAsNonRoot") and str(sec.get("runAsUser", "")) == "0":
        raise ConfigError("the pod says runAsNonRoot but runs as uid 0")
    if "fsGroup" in pod_sec:
        args += ["--group-add", str(pod_sec["fsGroup"])]
    if sec.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    caps = sec.get("capabilities", {})
    args += [f"--cap-drop={cap}" for cap in caps.get("drop", [])]
    args += [f"--cap-add={cap}" for cap in caps.get("add", [])]
    if sec.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if sec.get("privileged"):
        args.append("--privileged")
    seccomp = sec.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp == "Localhost":
        args += ["--security-opt", f"seccomp={sec['seccompProfile']['localhostProfile']}"]
    # RuntimeDefault: the engine's default profile, which docker applies unless told otherwise
    limits = c.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        # docker refuses a limit above the host's CPUs, which a pod for a bigger node can ask for
        wanted, host = quantity_cpus(limits["cpu"]), float(os.cpu_count() or 1)
        if wanted > host:
            LOG.warning(
                "the pod's CPU limit is %g but this machine has %g CPUs: docker runs it with --cpus %g "
                "(on a node the chart's limit applies)",
                wanted,
                host,
                host,
            )
        args += ["--cpus", f"{min(wanted, host):g}"]
    if "memory" in limits:
        memory = quantity_bytes(limits["memory"])
        args += ["--memory", str(memory), "--memory-swap", str(memory)]
    for env in c.get("env", []):
        if "value" not in env:
            raise ConfigError(f"the docker target cannot resolve env {env['name']} (valueFrom)")
        args += ["--env", f"{env['name']}={env['value']}"]
    args += _volume_args(pod, c, files_dir)
    if "terminationGracePeriodSeconds" in spec:
        args += ["--stop-timeout", str(int(spec["terminationGracePeriodSeconds"]))]
    if c.get("command"):
        args += ["--entrypoint", c["command"][0]]
    for key, value in pod.labels.items():
        args += ["--label", f"{key}={value}"]
    return args


def container_command(pod: RenderedPod) -> list[str]:
    """What goes after the image: the container's ``command`` tail and ``args``."""
    c = pod.container
    return [*c.get("command", [])[1:], *c.get("args", [])]


def _volume_args(pod: RenderedPod, c: dict[str, Any], files_dir: Path) -> list[str]:
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
    args: list[str] = []
    for mount in c.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            raise ConfigError(f"volume mount {mount['name']!r} names no volume of the pod")
        path = mount["mountPath"]
        if "emptyDir" in volume:
            opts = ["rw", "exec", "nosuid", "nodev", "mode=1777"]
            size = volume["emptyDir"].get("sizeLimit")
            if size:
                opts.append(f"size={quantity_bytes(size)}")
            if fs_group is not None:
                opts.append(f"gid={fs_group}")
            args += ["--tmpfs", f"{path}:{','.join(opts)}"]
        elif "configMap" in volume:
            name = volume["configMap"]["name"]
            data = pod.config_maps.get(name)
            if data is None:
                raise ConfigError(f"the pod mounts ConfigMap {name!r}, which the chart did not render")
            folder = files_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            for key, text in data.items():
                (folder / key).write_text(text)
            args += ["--mount", f"type=bind,source={folder.resolve()},target={path},readonly"]
        else:
            kind = next((k for k in volume if k != "name"), "?")
            raise ConfigError(
                f"the docker target cannot mount volume {mount['name']!r} ({kind}); "
                "serve images with the model baked in (artifact.source: image)"
            )
    return args
