"""The one generic BentoML service: any variant, any runtime, chosen by a ServiceSpec file.

``bentoml serve optiserve.services.service:OptiserveService`` with ``OPTISERVE_SERVICE_SPEC`` pointing
at a ``service.json`` (written by :mod:`optiserve.deploy.targets.local` or baked into a Bento). Endpoints:

- one ASGI app (:mod:`optiserve.services.oip`) for every protocol: ``POST /predict``
  (``{"inputs": [[...], ...]}`` → the model's first output), the Open Inference Protocol v2 with Triton's
  configuration and statistics extensions, and the raw-input routes;
- ``/readyz``, ``/livez`` and ``/metrics`` (BentoML's; the metrics contract is :mod:`optiserve.metrics`).

Requests for the protocol's paths go to that app from a middleware, ahead of BentoML's router
(:mod:`optiserve.services.protocol_paths`).

All of them share one :class:`~optiserve.services.core.ServingCore`: one runtime, one adaptive batcher,
one validation. Ready only after the artifact's checksum was verified, the runtime loaded and warm-up
inferences ran through the batcher. On SIGTERM the server stops accepting connections and finishes
the requests in flight before it exits.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import bentoml

from optiserve.manifest import read_model
from optiserve.services.core import ServingCore
from optiserve.services.oip import create_app
from optiserve.services.protocol_paths import ProtocolPathsFirst
from optiserve.services.replicas import become_replica
from optiserve.types import ServiceSpec

SPEC_ENV = "OPTISERVE_SERVICE_SPEC"
BENTO_SPEC = "model/service.json"
"""Where a Bento built by `optiserve build` keeps its spec (relative to the Bento's src/, the working
directory BentoML serves a Bento from); used when the environment names none."""


def _spec_from_env() -> ServiceSpec | None:
    """The ServiceSpec (``$OPTISERVE_SERVICE_SPEC``, else a Bento's own); a relative ``variant_dir``
    (as in a Bento) is relative to the spec file's folder."""
    path = os.environ.get(SPEC_ENV) or (BENTO_SPEC if Path(BENTO_SPEC).is_file() else None)
    if not path:
        return None
    spec = read_model(Path(path), ServiceSpec)
    if not Path(spec.variant_dir).is_absolute():
        spec = spec.model_copy(update={"variant_dir": str((Path(path).parent / spec.variant_dir).resolve())})
    return spec


SPEC = _spec_from_env()
if SPEC is not None:
    become_replica(SPEC.replicas)  # before uvicorn takes the listening socket and the runtime its CPUs
_CORE: list[ServingCore] = []  # set once per worker process by the service's __init__

routes = create_app(lambda: _CORE[0] if _CORE else None)
INFERENCE_PATHS = ["/v2/models", "/predict", "/classify", "/embed"]


def bento_config(spec: ServiceSpec | None) -> dict[str, Any]:
    """BentoML settings. Per-request access logs and tracing spans cost ~0.25 ms a request together
    (measured on the tiny MLP: 0.77 → 0.53 ms p50), so both are off for inference paths unless the
    ServiceSpec asks for them; Prometheus metrics stay on."""
    access_log = bool(spec and spec.access_log)
    config: dict[str, Any] = {
        "name": "optiserve",
        "workers": spec.replicas if spec else 1,
        "traffic": {"timeout": 120},
        "logging": {"access": {"enabled": access_log}},
    }
    if not (spec and spec.tracing):
        config["tracing"] = {"excluded_urls": INFERENCE_PATHS}
    return config


@bentoml.service(**bento_config(SPEC))
@bentoml.asgi_app(routes, path="/")
class OptiserveService:
    def __init__(self) -> None:
        if SPEC is None:
            raise RuntimeError(f"{SPEC_ENV} is not set: start this service with `optiserve serve`")
        self.core = ServingCore(SPEC)
        _CORE[:] = [self.core]

    @bentoml.on_startup  # type: ignore[untyped-decorator]
    async def warm_up(self) -> None:
        await self.core.warm_up()
        self._sampler = asyncio.get_running_loop().create_task(self.core.sample_process())

    @bentoml.on_shutdown  # type: ignore[untyped-decorator]
    def drain(self) -> None:
        self.core.stop()

    def __is_ready__(self) -> bool:
        core = getattr(self, "core", None)
        return bool(core is not None and core.ready)


# The mount above keeps BentoML's OpenAPI view of the app; requests for the protocol's paths skip its
# router (see services/protocol_paths.py). bentoml.service returns its Service, typed as the class.
OptiserveService.add_asgi_middleware(ProtocolPathsFirst, protocol_app=routes)  # type: ignore[attr-defined]
