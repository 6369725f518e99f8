"""The deployment target contract: ``start(spec) -> Endpoint``, ``stop(endpoint)``, and where the
served variant's metrics are scraped from.

A target is a context manager: whatever happens inside it (success, an error, Ctrl-C), every server it
started is stopped before it exits. Load generation never asks which target served an Endpoint.
Adding a target is adding one file to this folder.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

import httpx

from optiserve.errors import ServingError
from optiserve.registry import Plugin
from optiserve.types import Endpoint, ServiceSpec

if TYPE_CHECKING:
    from optiserve.config import ExperimentConfig
    from optiserve.progress import Steps

STARTUP_FAILED = "Application startup failed"
"""Logged (by uvicorn) when the service's __init__ raised; BentoML then restarts the worker forever."""


class Target(Plugin, base=True, package="optiserve.deploy.targets"):
    """Base of the deployment targets (``local``, ``docker``, ``kubernetes``)."""

    metrics_source: ClassVar[str] = "the server's /metrics"
    """Where a served variant's Prometheus metrics come from, in words (for `optiserve doctor`)."""

    def __init__(self, workdir: Path, *, ready_timeout_s: float = 300.0, **options: Any) -> None:
        """``options``: target-specific settings (the experiment's ``kubernetes:`` section); a target
        ignores those that are not its own."""
        self.workdir = workdir
        self.ready_timeout_s = ready_timeout_s

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def prepare(self, specs: Sequence[ServiceSpec], steps: Steps) -> None:
        """Make what ``start`` needs for these pairs and is missing (the docker target: their images).
        ``run``, ``bench`` and ``compare`` call it first; ``serve`` serves only what exists."""

    def start(self, spec: ServiceSpec, cpus: frozenset[int] | None = None) -> Endpoint:
        """Serve ``spec`` (on ``cpus`` only, when given); return once it is ready (model loaded,
        warmed up)."""
        raise NotImplementedError

    def stop(self, endpoint: Endpoint) -> None:
        """Stop one server this target started (draining what is in flight)."""
        raise NotImplementedError

    def stop_all(self) -> None:
        raise NotImplementedError

    def has_server_metrics(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint`` exposes optiserve's metrics contract (else it is measured client-side)."""
        return True

    def metrics_url(self, endpoint: Endpoint) -> str:
        """The URL a Prometheus (or a direct scrape) reads this server's metrics from."""
        return f"{endpoint.url}/metrics"


def target_for(name: str, workdir: Path, *, ready_timeout_s: float = 300.0, **options: Any) -> Target:
    """The named target, checked to be usable here (its packages, its engine) before anything starts."""
    cls = Target.get(name)
    cls.require_available()
    return cls(workdir, ready_timeout_s=ready_timeout_s, **options)


def configured_target(config: ExperimentConfig) -> Target:
    """The experiment's target (``serving.target``), with its settings."""
    return target_for(
        config.serving.target,
        config.workdir,
        ready_timeout_s=config.serving.ready_timeout_s,
        url=config.serving.url,
        **config.kubernetes.model_dump(),
    )


def wait_ready(
    url: str, timeout_s: float, failure: Callable[[], str | None], *, interval_s: float = 0.25
) -> bool:
    """Poll ``url`` until it answers 200 (True) or ``timeout_s`` passes (False). ``failure`` is asked
    each round why the server can no longer become ready (exited, failed its start-up), and its answer
    is raised as a ServingError."""
    return _poll(lambda client: client.get(url).status_code == 200, timeout_s, failure, interval_s)


def _poll(
    done: Callable[[httpx.Client], bool],
    timeout_s: float,
    failure: Callable[[], str | None],
    interval_s: float = 0.25,
) -> bool:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            problem = failure()
            if problem:
                raise ServingError(problem)
            with contextlib.suppress(httpx.HTTPError):
                if done(client):
                    return True
            time.sleep(interval_s)
    return False


def ready_workers(metrics_text: str) -> int:
    """How many worker processes report ready in a server's /metrics (``optiserve_ready``, summed over
    the live workers)."""
    from prometheus_client.parser import text_string_to_metric_families

    from optiserve.metrics import READY

    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples
            if sample.name == READY.name
        )
    )


def wait_workers_ready(url: str, workers: int, timeout_s: float, failure: Callable[[], str | None]) -> bool:
    """After ``/readyz`` answered (one worker is ready), poll ``url``/metrics until all ``workers`` are:
    the load must not start while some replicas still load their model."""
    return _poll(
        lambda client: ready_workers(client.get(f"{url}/metrics").text) >= workers, timeout_s, failure
    )


def startup_failed(log_text: str) -> bool:
    return STARTUP_FAILED in log_text
