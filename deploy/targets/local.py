"""The local target (the default): one ``bentoml serve`` process per variant on this machine, pinned to
the CPUs it is given; stopping it stops its whole process group (SIGTERM drains, then SIGKILL).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar

from optiserve.errors import ServingError
from optiserve.manifest import write_model
from optiserve.procs import free_port, port_in_use, spawn, stop_group, tail
from optiserve.types import Endpoint, ServiceSpec

from .base import Target, startup_failed, wait_ready, wait_workers_ready

SERVICE_IMPORT = "optiserve.services.service:OptiserveService"


class LocalTarget(Target):
    name: ClassVar[str] = "local"
    description: ClassVar[str] = "one `bentoml serve` process per variant on this machine"
    requires: ClassVar[tuple[str, ...]] = ("bentoml",)
    extra: ClassVar[str] = "serve"

    def __init__(self, workdir: Path, *, ready_timeout_s: float = 300.0, **options: Any) -> None:
        super().__init__(workdir, ready_timeout_s=ready_timeout_s)
        self._procs: dict[str, object] = {}
        self._names: dict[str, str] = {}  # endpoint URL → process name

    def start(self, spec: ServiceSpec, cpus: frozenset[int] | None = None) -> Endpoint:
        """Start a server for ``spec`` (on ``cpus`` only, when given) and return once it answers
        ``/readyz`` (model loaded, warmed up)."""
        if spec.port is not None and port_in_use(spec.port, spec.host):
            raise ServingError(
                f"port {spec.port} on {spec.host} is already in use", hint="pick another with --port"
            )
        port = spec.port or free_port(spec.host)
        spec = spec.model_copy(update={"port": port})
        name = f"{spec.variant.id}.{spec.runtime}"
        if name in self._procs:  # a second server of the same pair (an A/A comparison)
            name = f"{name}.{port}"
        run_dir = self.workdir / "services" / name
        spec_path = run_dir / "service.json"
        write_model(spec_path, spec)
        log = run_dir / "server.log"
        log.unlink(missing_ok=True)
        env = dict(
            os.environ,
            OPTISERVE_SERVICE_SPEC=str(spec_path.resolve()),
            # Each server its own BentoML home: a starting server empties its home's Prometheus
            # multiprocess folder, which would wipe the metrics of every other server sharing it.
            BENTOML_HOME=str((run_dir / "bentoml-home").resolve()),
            BENTOML_DO_NOT_TRACK="true",
            PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        cmd = [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            SERVICE_IMPORT,
            "--host",
            spec.host,
            "--port",
            str(port),
        ]
        proc = spawn(cmd, log=log, env=env, cwd=run_dir, cpus=cpus)
        self._procs[name] = proc
        url = f"http://{spec.host}:{port}"
        self._wait_ready(name, url, log, spec.replicas)
        self._names[url] = name
        return Endpoint(service=spec, url=url, target="local")

    def _wait_ready(self, name: str, url: str, log: Path, workers: int) -> None:
        proc = self._procs[name]

        def failure() -> str | None:
            if proc.poll() is not None:  # type: ignore[attr-defined]
                return f"server for {name} exited during start-up; last lines of {log}:\n{tail(log)}"
            if _startup_failed(log):
                return f"server for {name} failed to initialise; last lines of {log}:\n{tail(log)}"
            return None

        try:
            ready = wait_ready(f"{url}/readyz", self.ready_timeout_s, failure)
            if ready and workers > 1:
                ready = wait_workers_ready(url, workers, self.ready_timeout_s, failure)
        except ServingError:
            self._stop_name(name)
            raise
        if not ready:
            self._stop_name(name)
            raise ServingError(
                f"server for {name} not ready after {self.ready_timeout_s:.0f}s; see {log}:\n{tail(log)}"
            )

    def stop(self, endpoint: Endpoint) -> None:
        name = self._names.pop(endpoint.url, None)
        if name is not None:
            self._stop_name(name)

    def process(self, endpoint: Endpoint) -> object:
        """The server process of ``endpoint`` (tests signal it directly)."""
        return self._procs[self._names[endpoint.url]]

    def _stop_name(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            stop_group(proc)  # type: ignore[arg-type]

    def stop_all(self) -> None:
        for name in list(self._procs):
            self._stop_name(name)
        self._names.clear()


def _startup_failed(log: Path) -> bool:
    try:
        return startup_failed(log.read_text(errors="replace"))
    except OSError:
        return False
