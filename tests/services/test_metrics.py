"""The metrics contract, read from a real server's /metrics: every metric, the identity labels, and
counts that match the requests sent."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from optiserve import metrics as contract
from optiserve.services.oip_codec import encode_request
from optiserve.types import Endpoint
from tests.conftest import random_inputs

pytestmark = pytest.mark.slow


def scrape(endpoint: Endpoint) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{endpoint.url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("optiserve_"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_every_contract_metric_is_exported_with_the_identity_labels(mlp_endpoint: Endpoint) -> None:
    httpx.post(mlp_endpoint.predict_url, json={"inputs": random_inputs(1).tolist()}, timeout=30)
    samples = scrape(mlp_endpoint)
    identity = contract.identity(mlp_endpoint.service)
    for metric in contract.ALL:
        names = {n for n, _ in samples}
        exported = metric.series if metric.kind != "histogram" else f"{metric.name}_bucket"
        assert exported in names, f"{exported} missing from /metrics"
        for (n, labels), _ in samples.items():
            if n.startswith(metric.name):
                assert identity.items() <= dict(labels).items(), (n, labels)
    assert value(samples, "optiserve_ready") == 1.0
    assert value(samples, "optiserve_model_load_seconds") > 0


def test_counts_match_the_requests_sent(mlp_endpoint: Endpoint) -> None:
    body, length = encode_request("input", random_inputs(1))
    headers = {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(length)}
    before = scrape(mlp_endpoint)

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=mlp_endpoint.url, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post(mlp_endpoint.infer_url, content=body, headers=headers) for _ in range(40))
            )
            assert all(r.status_code == 200 for r in responses)
            bad = await client.post(mlp_endpoint.predict_url, json={"inputs": [[0.5] * 3]})
            assert bad.status_code == 422

    asyncio.run(burst())
    after = scrape(mlp_endpoint)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("optiserve_requests_total", protocol="oip", code="200") == 40
    assert delta("optiserve_request_duration_seconds_count", protocol="oip") == 40
    assert delta("optiserve_requests_total", protocol="native", code="422") == 1
    assert delta("optiserve_errors_total", kind="invalid_input") == 1
    assert delta("optiserve_queue_wait_seconds_count") == 40
    assert delta("optiserve_batch_size_sum") == 40  # every sample ran exactly once
    batches = delta("optiserve_batch_size_count")
    assert 1 <= batches <= 40
    assert delta("optiserve_inference_duration_seconds_count") == batches


def test_latency_buckets_are_dense_between_1_and_100_ms() -> None:
    inside = [b for b in contract.LATENCY_BUCKETS_S if 0.001 <= b <= 0.1]
    assert len(inside) >= 20
    assert all(b2 / b1 <= 1.5 for b1, b2 in itertools.pairwise(inside[1:]))


def test_quantile_query_uses_the_contract_names_and_labels() -> None:
    q = contract.quantile_query(contract.REQUEST_DURATION, 0.99, variant="v1")
    assert 'optiserve_request_duration_seconds_bucket{variant="v1"}' in q
    assert "histogram_quantile(0.99" in q
    with pytest.raises(ValueError, match="not a histogram"):
        contract.quantile_query(contract.ERRORS, 0.5)
