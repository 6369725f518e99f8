"""Server-side figures through a real Prometheus, and the /metrics fallback, against a real served model.

One window is measured three ways at once: a ``prometheus`` started by :class:`PrometheusServer`, the
same server queried as an :class:`ExternalPrometheus`, and a :class:`ScrapeSource`. The load is idle
for longer than a scrape interval on both sides of each window edge, so every source must count the
requests sent exactly.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from optiserve.config import ExperimentConfig, with_overrides
from optiserve.deploy.targets.local import LocalTarget
from optiserve.errors import ConfigError, LoadTestError
from optiserve.metrics import LATENCY_BUCKETS_S
from optiserve.procs import free_port
from optiserve.prometheus import (
    ExternalPrometheus,
    PrometheusServer,
    ScrapeSource,
    histogram_quantile,
    measurement_source,
    server_side_stats,
    value_at,
)
from optiserve.services.oip_codec import encode_request
from optiserve.types import Endpoint, ServerSideStats, Variant
from tests.conftest import (
    describe,
    processes_mentioning,
    random_inputs,
    service_spec,
    wait_until_gone,
)

pytestmark = pytest.mark.slow

N_REQUESTS = 300
QUIET_S = 2.25
"""Idle time on both sides of each window edge: longer than a scrape interval (1 s), so the scrapes
either side of each edge see the same counts and interpolating between them is exact."""


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Skip without ``prometheus``, except in CI, which installs it (a missing binary there is a failure).

    Requested before any server fixture, so that a skip does not start a server first."""
    found = shutil.which("prometheus")
    if found is not None:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("prometheus not on PATH in CI: `make system-deps` must install it")
    pytest.skip("prometheus not on PATH (make system-deps installs it)")


@dataclass(frozen=True)
class Measured:
    codes: list[int]
    client_ms: np.ndarray
    prometheus: ServerSideStats
    idle_after: ServerSideStats
    """The same window read with ``idle_after`` (the load stopped at its end, as it does here)."""
    external: ServerSideStats
    scrape: ServerSideStats
    description: str
    left_behind: str
    """Processes of the Prometheus run folder still alive after the context manager exited."""


def drive(endpoint: Endpoint, n: int) -> tuple[float, float, list[int], np.ndarray]:
    """``n`` sequential binary OIP requests inside a window, idle for ``QUIET_S`` on both sides of each
    edge; returns (start, end, status codes, client latencies in ms)."""
    body, length = encode_request(endpoint.service.variant.model.inputs[0].name, random_inputs(1))
    headers = {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(length)}
    codes, latencies = [], []
    with httpx.Client(timeout=30) as client:
        client.post(endpoint.infer_url, content=body, headers=headers)  # connect before the window
        time.sleep(QUIET_S)  # ... and let scrapes see that request before the window starts
        start = time.time()
        time.sleep(QUIET_S)
        for _ in range(n):
            began = time.perf_counter()
            response = client.post(endpoint.infer_url, content=body, headers=headers)
            latencies.append((time.perf_counter() - began) * 1000.0)
            codes.append(response.status_code)
        time.sleep(QUIET_S)
        end = time.time()
    return start, end, codes, np.asarray(latencies)


@pytest.fixture(scope="module")
def served(
    prometheus_binary: str,
    onnx_source: Variant,
    variants_workdir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Endpoint]:
    """The ONNX MLP served as ``mlp_endpoint`` serves it, but with a BentoML home of its own.

    Not ``mlp_endpoint`` itself: every ``bentoml serve`` start empties ``$BENTOML_HOME/
    prometheus_multiproc_dir``, where all servers sharing that home keep their metrics, so any server
    started later (by another test of the session, or another session on this machine) wipes the
    session server's metrics for good, and its /metrics no longer counts anything.
    """
    home = tmp_path_factory.mktemp("bentoml-home")
    with (
        LocalTarget(tmp_path_factory.mktemp("serve"), ready_timeout_s=120) as deployment,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("BENTOML_HOME", str(home))  # read by LocalTarget.start, for the server only
        endpoint = deployment.start(service_spec(onnx_source, variants_workdir, "onnxruntime"))
        env.undo()
        yield endpoint


@pytest.fixture(scope="module")
def measured(prometheus_binary: str, served: Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Measured:
    run_dir = tmp_path_factory.mktemp("prometheus-run")
    with PrometheusServer(run_dir, binary=prometheus_binary) as server, ScrapeSource(served) as scrape:
        server.add_target(served)
        start, end, codes, client_ms = drive(served, N_REQUESTS)
        stats = server_side_stats(server, served, start, end)
        idle_after = server_side_stats(server, served, start, end, idle_after=True)
        external = server_side_stats(ExternalPrometheus(server.url), served, start, end)
        scraped = server_side_stats(scrape, served, start, end)
        description = server.description
    left = wait_until_gone((str(run_dir),), timeout=5)
    return Measured(codes, client_ms, stats, idle_after, external, scraped, description, describe(left))


def bucket_upper_ms(ms: float) -> float:
    """The upper bound (ms) of the latency bucket that ``ms`` falls in."""
    return next((b * 1000.0 for b in LATENCY_BUCKETS_S if ms <= b * 1000.0 + 1e-9), math.inf)


def test_prometheus_counts_every_request_and_reports_batch_cpu_memory(measured: Measured) -> None:
    assert measured.codes == [200] * N_REQUESTS
    stats = measured.prometheus
    assert stats.source == "prometheus"
    assert stats.requests == measured.idle_after.requests == N_REQUESTS
    assert stats.mean_batch_size is not None and stats.mean_batch_size >= 1.0
    assert stats.queue_wait_p50_ms is not None and stats.queue_wait_p50_ms >= 0.0
    assert stats.cpu_percent is not None and stats.cpu_percent > 0.0
    assert stats.memory_mib is not None and stats.memory_mib > 10.0
    assert (
        measured.description.startswith("Prometheus 2.")
        and "started by optiserve on :" in measured.description
    )


def test_server_side_latency_agrees_with_the_client_within_a_bucket(measured: Measured) -> None:
    """Server-side p50/p99 are at most the upper bound of the bucket the client-side figure falls in.

    Why this bound is sound: the server times each request from body received to response ready, a
    part of the client's round trip, so every server duration is <= its client duration, and the k-th
    smallest server duration is <= the k-th smallest client duration. ``histogram_quantile`` picks rank
    q·n (150 and 297 of 300), finds the bucket holding that order statistic and interpolates inside it,
    so its estimate is at most that bucket's upper bound; numpy's percentile of the client durations
    (linear between ranks) is >= the client's order statistic at that rank. Hence the estimate <= the
    upper bound of the bucket containing the client figure. The server figure can be far below the
    client's (network, HTTP client and Python overhead): that is not an error, so only > 0 is checked.
    """
    stats = measured.prometheus
    for q, server_ms in ((50, stats.p50_ms), (99, stats.p99_ms)):
        client_ms = float(np.percentile(measured.client_ms, q))
        assert server_ms is not None and server_ms > 0.0
        assert server_ms <= bucket_upper_ms(client_ms), (
            f"p{q}: server {server_ms:.3f} ms, client {client_ms:.3f}"
        )


def test_prometheus_process_is_gone_after_the_context_manager(measured: Measured) -> None:
    assert measured.left_behind == "", f"left running:\n{measured.left_behind}"


def test_scrape_fallback_agrees_with_prometheus(measured: Measured) -> None:
    prom, scrape = measured.prometheus, measured.scrape
    assert scrape.source == "scrape"
    assert scrape.requests == prom.requests == N_REQUESTS
    assert prom.p50_ms is not None and scrape.p50_ms is not None
    assert bucket_upper_ms(scrape.p50_ms) == bucket_upper_ms(prom.p50_ms)
    assert scrape.p50_ms == pytest.approx(prom.p50_ms, rel=1e-6)  # same bucket deltas, same interpolation
    assert scrape.mean_batch_size == pytest.approx(prom.mean_batch_size)
    assert scrape.memory_mib is not None and scrape.cpu_percent is not None


def test_external_prometheus_gives_the_same_figures(measured: Measured) -> None:
    assert measured.external == measured.prometheus


def test_prometheus_that_cannot_start_is_a_one_line_error(prometheus_binary: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LoadTestError) as e:
            PrometheusServer(tmp_path, binary=prometheus_binary, port=port).start()
    message = e.value.one_line()
    assert "\n" not in message
    assert "address already in use" in message and message.startswith("prometheus exited during start-up")
    assert not processes_mentioning(str(tmp_path))


def test_an_unscrapable_target_is_a_one_line_error(
    prometheus_binary: str, served: Endpoint, tmp_path: Path
) -> None:
    nowhere = served.model_copy(update={"url": f"http://127.0.0.1:{free_port()}"})
    with (
        PrometheusServer(tmp_path, binary=prometheus_binary, target_timeout_s=8) as server,
        pytest.raises(LoadTestError) as e,
    ):
        server.add_target(nowhere)
    message = e.value.one_line()
    assert "\n" not in message and "could not scrape" in message and "connection refused" in message
    assert not wait_until_gone((str(tmp_path),), timeout=5)


# --- no server needed -----------------------------------------------------------------------------------


def test_measurement_source_falls_back_to_scraping_without_prometheus(tmp_path: Path) -> None:
    with measurement_source(None, tmp_path, which=lambda _: None) as source:
        assert isinstance(source, ScrapeSource)
        assert source.kind == "scrape"
        assert source.description == "no prometheus on PATH: /metrics scraped directly"


def test_an_unreachable_external_prometheus_is_a_one_line_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LoadTestError, match="did not answer") as e:
        measurement_source(url, tmp_path)
    assert "\n" not in e.value.one_line()


def test_prometheus_url_must_be_http() -> None:
    assert with_overrides(ExperimentConfig(), {"load.prometheus_url": "http://p:9090"}).load.prometheus_url
    with pytest.raises(ConfigError, match="prometheus_url"):
        with_overrides(ExperimentConfig(), {"load.prometheus_url": "p:9090"})


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [(1.0, 0), (2.0, 10), (math.inf, 10)], 1.5),  # inside the second bucket
        (0.5, [(1.0, 4), (math.inf, 4)], 0.5),  # the first bucket starts at 0
        (0.99, [(1.0, 1), (2.0, 1), (math.inf, 10)], 2.0),  # in +Inf: the highest finite bound
        (0.5, [(2.0, 10), (1.0, 0), (math.inf, 10)], 1.5),  # order does not matter
        (0.5, [(1.0, 5), (2.0, 4), (math.inf, 10)], 1.0),  # non-monotonic counts are made monotonic
        (0.5, [(1.0, 0), (math.inf, 0)], None),  # no observations
        (0.5, [(1.0, 3), (2.0, 5)], None),  # no +Inf bucket
    ],
)
def test_histogram_quantile_follows_prometheus(
    q: float, buckets: list[tuple[float, float]], expected: float | None
) -> None:
    assert histogram_quantile(q, buckets) == expected


@pytest.mark.parametrize(
    ("when", "idle_after", "expected"),
    [
        (15.0, False, 150.0),  # halfway between the samples at 10 s and 20 s
        (15.0, True, 200.0),  # nothing happened after 15 s: the sample at 20 s is exact
        (10.0, False, 100.0),  # on a sample
        (5.0, False, 0.0),  # before the first sample: the series did not exist yet
        (25.0, True, 200.0),  # after the last sample: its value
    ],
)
def test_value_at_reads_a_counter_between_the_scrapes_around_an_edge(
    when: float, idle_after: bool, expected: float
) -> None:
    assert value_at([(10.0, 100.0), (20.0, 200.0)], when, idle_after=idle_after) == pytest.approx(expected)
