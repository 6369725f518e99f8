"""Readiness and graceful shutdown of a real server whose model takes half a second per batch."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from optiserve.deploy.targets.local import LocalTarget
from optiserve.models.resolve import resolve_model
from optiserve.optimizers.source import materialize_source
from optiserve.types import Endpoint
from tests.conftest import random_inputs, service_spec
from tests.tiny_models import N_IN, SLOW_S

pytestmark = pytest.mark.slow


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[tuple[LocalTarget, Endpoint]]:
    variant = materialize_source(resolve_model("tests.tiny_models:slow_mlp", input_shape=(N_IN,)), tmp_path)
    with LocalTarget(tmp_path, ready_timeout_s=120) as deployment:
        yield deployment, deployment.start(service_spec(variant, tmp_path, "torch-eager"))


def test_ready_only_after_warm_up_inferences(slow_server: tuple[LocalTarget, Endpoint]) -> None:
    _, endpoint = slow_server
    log = (Path(endpoint.service.variant_dir).parents[1] / "services").glob("*/server.log")
    text = next(log).read_text()
    assert "Completed async startup hook: warm_up" in text
    assert httpx.get(f"{endpoint.url}/v2/health/ready", timeout=10).status_code == 200
    load = httpx.get(f"{endpoint.url}/metrics", timeout=10).text
    # 12 + 8 warm-up samples at SLOW_S per batch: ready cannot come sooner than the sequential ones.
    (line,) = [x for x in load.splitlines() if x.startswith("optiserve_model_load_seconds{")]
    assert float(line.rsplit(" ", 1)[1]) >= 12 * SLOW_S


def test_sigterm_drains_the_requests_in_flight(slow_server: tuple[LocalTarget, Endpoint]) -> None:
    deployment, endpoint = slow_server
    (proc,) = deployment._procs.values()
    x = random_inputs(1).tolist()

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            requests = [
                asyncio.create_task(client.post(endpoint.predict_url, json={"inputs": x})) for _ in range(4)
            ]
            await asyncio.sleep(SLOW_S / 2)  # all four are in flight: one running, three queued
            os.kill(proc.pid, signal.SIGTERM)  # type: ignore[attr-defined]
            responses = await asyncio.gather(*requests, return_exceptions=True)
        return [r.status_code if isinstance(r, httpx.Response) else -1 for r in responses]

    started = time.monotonic()
    statuses = asyncio.run(scenario())
    assert statuses == [200] * 4, statuses
    proc.wait(timeout=30)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 30
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{endpoint.url}/v2/health/live", timeout=5)
