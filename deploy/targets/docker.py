"""The docker target: each variant's image (``optiserve build --containerize``), run as the chart's pod.

The ``docker run`` options come from the chart itself (:mod:`optiserve.deploy.podspec`): the same
user, read-only root, dropped capabilities, seccomp, tmpfs scratch space, CPU and memory limits, env and
port as a Kubernetes node would give the pod. The port is published on 127.0.0.1 only; the CPUs a run
pins the server to become ``--cpuset-cpus``. Readiness is polled on the readiness probe's path, and a
container that exits or fails its start-up (a corrupted artifact refused by checksum, say) is an error
with the last lines of its log. Stopping sends SIGTERM and waits the pod's grace period (the server
drains what is in flight), then removes the container.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from optiserve.errors import ServingError
from optiserve.manifest import write_model
from optiserve.procs import free_port, port_in_use
from optiserve.progress import Steps
from optiserve.registry import Availability
from optiserve.types import Endpoint, ServiceSpec

from ..engine import START_HINT, docker, engine_problem, image_exists
from ..podspec import container_command, docker_run_args, rendered_pod
from .base import Target, startup_failed, wait_ready, wait_workers_ready

MANAGED_LABEL = "io.optiserve.managed=true"
LOG_LINES = 12


class DockerTarget(Target):
    name: ClassVar[str] = "docker"
    description: ClassVar[str] = "the variant's image in a local container engine, run as the chart's pod"
    metrics_source: ClassVar[str] = "the container's /metrics, on its published port"

    def __init__(self, workdir: Path, *, ready_timeout_s: float = 300.0, **options: Any) -> None:
        super().__init__(workdir, ready_timeout_s=ready_timeout_s)
        self._containers: dict[str, str] = {}  # endpoint URL → container name
        self._grace: dict[str, int] = {}

    @classmethod
    def availability(cls) -> Availability:
        problem = engine_problem()
        if problem:
            return Availability(False, f"no usable container engine: {problem}; {START_HINT}")
        return Availability(True)

    def prepare(self, specs: Sequence[ServiceSpec], steps: Steps) -> None:
        """Build the images that do not exist yet (as ``optiserve build --containerize`` would)."""
        missing = [s for s in specs if not image_exists(image_name(s))]
        if not missing:
            return
        from ..bento import build_bento, build_wheel
        from ..images import build_image

        log = self.workdir / "images" / "build.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix="optiserve-wheel.") as tmp,
            steps.task("Building missing images", total=len(missing)) as advance,
        ):
            wheel = build_wheel(Path(tmp))
            for spec in missing:
                advance(0, description=f"docker build {image_name(spec)}")
                build_image(build_bento(spec, wheel), wheel, log)
                advance(1)

    def start(self, spec: ServiceSpec, cpus: frozenset[int] | None = None) -> Endpoint:
        image = image_name(spec)
        if not image_exists(image):
            raise ServingError(
                f"no image {image} for {spec.variant.id} on {spec.runtime}",
                hint=f"build it: optiserve build --containerize -v {spec.variant.id} -r {spec.runtime}",
            )
        host_port = spec.port or free_port("127.0.0.1")
        if spec.port is not None and port_in_use(spec.port):
            raise ServingError(f"port {spec.port} on 127.0.0.1 is already in use (pick another with --port)")
        name = f"optiserve-{_dns(spec.variant.id)}-{spec.runtime}-{host_port}"
        run_dir = self.workdir / "services" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_model(run_dir / "service.json", spec)
        pod = rendered_pod(spec, run_dir)
        if pod.image != image:
            raise ServingError(f"the chart names image {pod.image}, expected {image}")
        args = [
            "run",
            "--detach",
            "--name",
            name,
            "--label",
            MANAGED_LABEL,
            "--publish",
            f"127.0.0.1:{host_port}:{pod.container_port}",
            *docker_run_args(pod, run_dir / "files"),
        ]
        if cpus:
            args += ["--cpuset-cpus", ",".join(str(c) for c in sorted(cpus))]
        args += [image, *container_command(pod)]
        with contextlib.suppress(ServingError):  # a leftover of an earlier run with the same name
            docker(["rm", "--force", name], what=f"docker rm {name}")
        try:
            docker(args, what=f"docker run {image}", timeout=120)
        except ServingError:
            with contextlib.suppress(ServingError):
                docker(["rm", "--force", name], what=f"docker rm {name}")
            raise
        (run_dir / "docker-run.txt").write_text("docker " + " ".join(args) + "\n")
        url = f"http://127.0.0.1:{host_port}"
        self._containers[url] = name
        self._grace[url] = int(pod.spec.get("terminationGracePeriodSeconds", 30))
        try:
            self._wait_ready(name, url, pod.probe_path("readinessProbe"), spec.replicas)
        except BaseException:
            self._remove(url)
            raise
        return Endpoint(service=spec.model_copy(update={"port": host_port}), url=url, target="docker")

    def _wait_ready(self, name: str, url: str, path: str, workers: int) -> None:
        def failure() -> str | None:
            inspect = ["inspect", "--format", "{{.State.Status}}", name]
            if docker(inspect, what=f"docker inspect {name}").strip() in ("exited", "dead"):
                return f"container {name} exited during start-up; its log:\n{self.logs(name)}"
            if startup_failed(self.logs(name, lines=200)):
                return f"container {name} failed to initialise; its log:\n{self.logs(name)}"
            return None

        ready = wait_ready(f"{url}{path}", self.ready_timeout_s, failure)
        if ready and workers > 1:
            ready = wait_workers_ready(url, workers, self.ready_timeout_s, failure)
        if not ready:
            raise ServingError(
                f"container {name} not ready after {self.ready_timeout_s:.0f}s; its log:\n{self.logs(name)}"
            )

    def logs(self, name: str, lines: int = LOG_LINES) -> str:
        done = subprocess.run(["docker", "logs", "--tail", str(lines), name], capture_output=True, text=True)
        return (done.stdout + done.stderr).strip()

    def container(self, endpoint: Endpoint) -> str:
        """The container serving ``endpoint`` (tests exec into it)."""
        return self._containers[endpoint.url]

    def stop(self, endpoint: Endpoint) -> None:
        self._remove(endpoint.url)

    def _remove(self, url: str) -> None:
        name = self._containers.pop(url, None)
        if name is None:
            return
        grace = self._grace.pop(url, 30)
        run_dir = self.workdir / "services" / name
        with contextlib.suppress(ServingError):
            docker(["stop", "--time", str(grace), name], what=f"docker stop {name}", timeout=grace + 30)
        with contextlib.suppress(OSError, ServingError):
            (run_dir / "container.log").write_text(self.logs(name, lines=100_000) + "\n")
        with contextlib.suppress(ServingError):
            docker(["rm", "--force", name], what=f"docker rm {name}")

    def stop_all(self) -> None:
        for url in list(self._containers):
            self._remove(url)


def image_name(spec: ServiceSpec) -> str:
    """The Bento tag convention: ``<variant id>:<runtime>``."""
    return f"{spec.variant.id}:{spec.runtime}"


def _dns(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40]
