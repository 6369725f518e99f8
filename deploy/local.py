"""The local target: one ``bentoml serve`` process per variant on this machine.

:class:`LocalDeployment` is a context manager: whatever happens inside it (success, an error, Ctrl-C),
every server it started is stopped, with its whole process group, before it exits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from optiserve.errors import ServingError
from optiserve.manifest import write_model
from optiserve.procs import free_port, spawn, stop_group, tail
from optiserve.types import Endpoint, ServiceSpec

SERVICE_IMPORT = "optiserve.services.service:OptiserveService"
STARTUP_FAILED = b"Application startup failed"
"""Logged (by uvicorn) when the service's __init__ raised; BentoML then restarts the worker forever."""


class LocalDeployment:
    def __init__(self, workdir: Path, *, ready_timeout_s: float = 300.0) -> None:
        self.workdir = workdir
        self.ready_timeout_s = ready_timeout_s
        self._procs: dict[str, object] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(self, spec: ServiceSpec, cpus: frozenset[int] | None = None) -> Endpoint:
        """Start a server for ``spec`` (on ``cpus`` only, when given) and return once it answers
        ``/readyz`` (model loaded, warmed up)."""
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
        self._wait_ready(name, url, log)
        return Endpoint(service=spec, url=url, target="local")

    def _wait_ready(self, name: str, url: str, log: Path) -> None:
        proc = self._procs[name]
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:  # type: ignore[attr-defined]
                    self.stop(name)
                    raise ServingError(
                        f"server for {name} exited during start-up; last lines of {log}:\n{tail(log)}"
                    )
                if _startup_failed(log):
                    self.stop(name)
                    raise ServingError(
                        f"server for {name} failed to initialise; last lines of {log}:\n{tail(log)}"
                    )
                try:
                    if client.get(f"{url}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        self.stop(name)
        raise ServingError(
            f"server for {name} not ready after {self.ready_timeout_s:.0f}s; see {log}:\n{tail(log)}"
        )

    def stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            stop_group(proc)  # type: ignore[arg-type]

    def stop_all(self) -> None:
        for name in list(self._procs):
            self.stop(name)


def _startup_failed(log: Path) -> bool:
    try:
        return STARTUP_FAILED in log.read_bytes()
    except OSError:
        return False
