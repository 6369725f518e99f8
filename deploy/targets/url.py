"""The url target: an Open Inference Protocol v2 server that is already running, named by its URL
(Triton, KServe, MLServer, a container, a cluster Service, or one of ours). Nothing is started or
stopped; ``start`` checks that the server is live and ready and that it serves the model.

What a foreign server is and takes (its model's inputs, whether it speaks the binary tensor extension)
is read from the protocol itself by :func:`describe_remote`, so the same scenarios, payload checks and
report apply. Server-side figures come from its ``/metrics`` where that carries optiserve's metrics
contract (one of our servers); other servers are measured client-side only, and the report says so.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from optiserve.errors import ConfigError, ServingError
from optiserve.services.validation import OIP_TO_NUMPY
from optiserve.types import Endpoint, ModelSpec, ServiceSpec, TensorSpec, Variant

from .base import Target

if TYPE_CHECKING:
    import numpy as np


class UrlTarget(Target):
    name: ClassVar[str] = "url"
    description: ClassVar[str] = "an Open Inference Protocol server already running at a URL (bench --url)"
    metrics_source: ClassVar[str] = "its /metrics where it follows optiserve's metrics contract, else none"

    def __init__(
        self, workdir: Path, *, ready_timeout_s: float = 300.0, url: str | None = None, **options: Any
    ):
        super().__init__(workdir, ready_timeout_s=ready_timeout_s)
        if not url:
            raise ConfigError("the url target needs a server URL (optiserve bench --url http://HOST:PORT)")
        self.url = url.rstrip("/")

    def start(self, spec: ServiceSpec, cpus: frozenset[int] | None = None) -> Endpoint:
        # cpus: the server runs wherever its owner put it; only the load generator is pinned from here.
        check_ready(self.url, spec.variant.model.name)
        split = httpx.URL(self.url)
        port = split.port or (443 if split.scheme == "https" else 80)
        service = spec.model_copy(update={"host": split.host, "port": port})
        return Endpoint(service=service, url=self.url, target="url")

    def stop(self, endpoint: Endpoint) -> None:
        """Not ours to stop."""

    def stop_all(self) -> None:
        """Not ours to stop."""

    def has_server_metrics(self, endpoint: Endpoint) -> bool:
        try:
            text = httpx.get(f"{endpoint.url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return False
        return "optiserve_request_duration_seconds" in text


def check_ready(url: str, model_name: str) -> None:
    """One line when ``url`` is not a live, ready OIP server serving ``model_name``."""
    try:
        with httpx.Client(timeout=10) as client:
            for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{model_name}/ready"):
                status = client.get(f"{url}{path}").status_code
                if status != 200:
                    raise ServingError(f"{url}{path} answered HTTP {status} (expected 200: live and ready)")
    except httpx.HTTPError as e:
        raise ServingError(
            f"no Open Inference Protocol server answers at {url} ({type(e).__name__}: {e})"
        ) from e


def describe_remote(url: str, model_name: str, local: ModelSpec | None) -> Variant:
    """A Variant standing for the model a remote server serves, from ``GET /v2/models/{name}``.

    ``local``: a model of ours with the same inputs (e.g. ``-m efficientnet-lite0`` against a server
    serving its ONNX file): its real data become the payloads. Its inputs must match the server's.
    One of our servers names its variant in the metadata's ``parameters``, so the id (and the Prometheus
    labels) are that variant's."""
    url = url.rstrip("/")
    check_ready(url, model_name)
    try:
        meta = httpx.get(f"{url}/v2/models/{model_name}", timeout=10).json()
    except (httpx.HTTPError, ValueError) as e:
        raise ServingError(f"{url}/v2/models/{model_name} gave no model metadata ({e})") from e
    inputs = tuple(_tensor(t, "input") for t in meta.get("inputs") or ())
    outputs = tuple(_tensor(t, "output") for t in meta.get("outputs") or ())
    if len(inputs) != 1:
        raise ConfigError(
            f"{model_name} at {url} declares {len(inputs)} inputs; the load generator sends one tensor"
        )
    params = meta.get("parameters") or {}
    ours = isinstance(params, dict) and "variant" in params
    if local is not None and local.inputs[0].sample_shape == inputs[0].sample_shape:
        renamed = local.inputs[0].model_copy(update={"name": inputs[0].name})
        spec = local.model_copy(
            update={"name": model_name, "inputs": (renamed,), "outputs": outputs or local.outputs}
        )
    else:
        if any(d is None for d in inputs[0].shape[1:]):
            raise ConfigError(
                f"{model_name}'s input {inputs[0].name} has a dynamic axis {inputs[0].shape}: "
                "give a model of ours with the same inputs (-m) so the payloads have a shape"
            )
        spec = ModelSpec(name=model_name, source="remote", ref=url, inputs=inputs, outputs=outputs)
    digest = hashlib.sha256(f"{url} {model_name}".encode()).hexdigest()[:6]
    vid = str(params["variant"]) if ours else f"{model_name}.remote.{digest}"
    return Variant(
        id=vid,
        model=spec,
        format="external",
        precision=_precision(str(params.get("precision", "fp32")) if ours else "fp32"),
        artifacts={},
        created_at=dt.datetime.now(dt.UTC),
    )


def runtime_label(url: str, model_name: str) -> str:
    """What serves the model, in the report's runtime column: our runtime, or the server's platform."""
    meta = httpx.get(f"{url.rstrip('/')}/v2/models/{model_name}", timeout=10).json()
    platform = str(meta.get("platform") or "")
    if platform.startswith("optiserve_"):
        return platform.removeprefix("optiserve_")
    server = httpx.get(f"{url.rstrip('/')}/v2", timeout=10).json()
    return str(server.get("name") or platform or "remote")


def probe_encoding(url: str, model_name: str, input_name: str, sample: np.ndarray) -> str:
    """``binary`` where the server answers a binary-extension request with 200, else ``json`` (the
    protocol's default encoding); one line when it takes neither."""
    from optiserve.services.oip_codec import encode_json_request, encode_request

    infer = f"{url.rstrip('/')}/v2/models/{model_name}/infer"
    body, header_length = encode_request(input_name, sample)
    with httpx.Client(timeout=60) as client:
        answer = client.post(
            infer,
            content=body,
            headers={
                "content-type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            },
        )
        if answer.status_code == 200:
            return "binary"
        answer = client.post(
            infer,
            content=encode_json_request(input_name, sample),
            headers={"content-type": "application/json"},
        )
    if answer.status_code == 200:
        return "json"
    raise ServingError(
        f"{infer} refused a one-sample request in both encodings (JSON: HTTP {answer.status_code} "
        f"{answer.text[:200]!r})"
    )


def _tensor(meta: dict[str, Any], what: str) -> TensorSpec:
    try:
        dtype = OIP_TO_NUMPY[str(meta["datatype"]).upper()]  # a dtype our specs lack fails validation
        shape = tuple(None if int(d) < 0 else int(d) for d in meta["shape"])
        return TensorSpec(name=str(meta["name"]), dtype=dtype, shape=shape)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"the server's {what} metadata {meta!r} is not an OIP tensor ({e})") from e


def _precision(text: str) -> Any:
    return text if text in ("fp32", "fp16", "int8") else "fp32"
