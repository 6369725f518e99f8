"""The kubernetes target: each variant as its own Helm release of the chart, reached through
``kubectl port-forward`` so the same load generator, scenarios and report apply.

Images must be where the cluster pulls from (``kubernetes.image_repository``: the registry prefix of
``optiserve build --containerize``'s images, pushed there). Load that outgrows one machine belongs in
the chart's in-cluster Locust (``optiserve bench --in-cluster``); a port-forward carries a benchmark's
worth of requests, not a cluster's capacity, and the report says which target served it.
Needs a live cluster (``kubectl cluster-info`` answers); none can be had on the project's CI machines.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from optiserve.errors import ServingError
from optiserve.procs import free_port, spawn, stop_group, tail
from optiserve.registry import Availability
from optiserve.types import Endpoint, ServiceSpec

from .. import k8s
from .base import Target, wait_ready


class KubernetesTarget(Target):
    name: ClassVar[str] = "kubernetes"
    description: ClassVar[str] = "a Helm release of the chart per variant, reached by kubectl port-forward"
    metrics_source: ClassVar[str] = (
        "the pod's /metrics through the port-forward (or the cluster's Prometheus)"
    )

    def __init__(
        self,
        workdir: Path,
        *,
        ready_timeout_s: float = 300.0,
        namespace: str = "default",
        image_repository: str = "",
        release_prefix: str = "optiserve",
        **options: Any,
    ) -> None:
        super().__init__(workdir, ready_timeout_s=ready_timeout_s)
        self.namespace = namespace
        self.image_repository = image_repository
        self.release_prefix = release_prefix
        self._served: dict[str, tuple[k8s.Target, Any]] = {}

    @classmethod
    def availability(cls) -> Availability:
        problem = k8s.cluster_problem()
        return Availability(False, f"no Kubernetes cluster: {problem}") if problem else Availability(True)

    def start(self, spec: ServiceSpec, cpus: frozenset[int] | None = None) -> Endpoint:
        # cpus: a node's CPUs are the kubelet's to assign (the chart's Guaranteed QoS pins whole cores
        # where the static CPU manager policy is on); nothing to pin from here.
        release = k8s.dns_label(f"{self.release_prefix}-{spec.variant.id}-{spec.runtime}", 50)
        target = k8s.Target(release=release, namespace=self.namespace)
        run_dir = self.workdir / "services" / release
        values = k8s.build_values(
            [spec],
            repository=self.image_repository,
            baked={(spec.variant.id, spec.runtime): k8s.baked_spec(spec)},
        )
        values_path = k8s.write_values(values, run_dir / "values.yaml")
        k8s.install(values_path, target, dry_run=False, wait_timeout_s=self.ready_timeout_s)
        (endpoint,) = k8s.endpoints(k8s.render(values_path, target), self.namespace)
        service = endpoint.url.removeprefix("http://").split(".", 1)[0]
        remote_port = endpoint.url.rsplit(":", 1)[1]
        port = spec.port or free_port("127.0.0.1")
        kubectl = shutil.which("kubectl") or "kubectl"
        log = run_dir / "port-forward.log"
        proc = spawn(
            [kubectl, "port-forward", "-n", self.namespace, f"svc/{service}", f"{port}:{remote_port}"],
            log=log,
        )
        url = f"http://127.0.0.1:{port}"
        self._served[url] = (target, proc)

        def failure() -> str | None:
            return (
                f"kubectl port-forward to {service} exited: {tail(log)}" if proc.poll() is not None else None
            )

        try:
            ready = wait_ready(f"{url}/v2/health/ready", 60, failure, interval_s=0.5)
        except ServingError:
            self._remove(url)
            raise
        if not ready:
            self._remove(url)
            raise ServingError(f"{service} did not answer through kubectl port-forward within 60s")
        return Endpoint(service=spec.model_copy(update={"port": port}), url=url, target="kubernetes")

    def stop(self, endpoint: Endpoint) -> None:
        self._remove(endpoint.url)

    def _remove(self, url: str) -> None:
        served = self._served.pop(url, None)
        if served is None:
            return
        target, proc = served
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            stop_group(proc)
        with contextlib.suppress(ServingError):
            k8s.uninstall(target)

    def stop_all(self) -> None:
        for url in list(self._served):
            self._remove(url)
