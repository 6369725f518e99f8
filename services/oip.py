"""HTTP routes beside BentoML's own: the Open Inference Protocol v2 REST API and the raw-input routes.

Open Inference Protocol v2 (what Triton, KServe, Seldon MLServer and their clients speak)::

    GET  /v2                                    server metadata (extensions: binary data, classification)
    GET  /v2/health/live                        200 while the process runs
    GET  /v2/health/ready                       200 once the model is loaded and warmed up
    GET  /v2/models/{name}[/versions/{v}]       model metadata (datatypes, shapes; -1 = dynamic axis)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer JSON tensors, or the binary tensor data extension
    GET  /v2/models/{name}[/versions/{v}]/config Triton's model configuration extension (perf_analyzer)
    GET  /v2/models/{name}[/versions/{v}]/stats  Triton's statistics extension

``{name}`` is the model's name or the variant id; the version is the variant id. For the built-in
models, a BYTES input carries what users send (JPEG/PNG bytes, UTF-8 text) and the service preprocesses
it; an output requested with ``parameters.classification = k`` comes back as Triton's classification
extension (``"score:index:label"`` strings, k per sample).

Every error, unknown routes and methods included, is a JSON ``{"error": "..."}`` with its 4xx/5xx status.

BentoML-native ``POST /predict``: ``{"inputs": [[...], ...]}`` (nested lists, first axis = samples) → the
model's first output as nested lists; a body that is not that shape of JSON is a 400.

Raw routes: ``POST /classify`` (an image body, ``image/jpeg`` or ``image/png``) → top-5 labels;
``POST /embed`` (a ``text/plain`` body) → the embedding. Every route goes through the one batcher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optiserve.errors import InputValidationError, InvalidInput, NotFound, UnsupportedMediaType

from .oip_codec import HEADER_LENGTH, InferRequest, OutputTensor, encode_response, parse_request
from .oip_json import dumps, load_object, tensor_from_json
from .triton import TRITON_VERSION, model_config
from .validation import oip_datatype

if TYPE_CHECKING:
    import numpy as np
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from .core import ServingCore

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
IMAGE_TYPES = ("image/jpeg", "image/png")


def create_app(get_core: Any) -> Starlette:
    """The routes, bound to the service's core through ``get_core()`` (set once the worker starts)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .core import retry_headers

    def core() -> ServingCore:
        c = get_core()
        if c is None:
            raise RuntimeError("the service has not initialised")
        return c  # type: ignore[no-any-return]

    async def server_metadata(request: Request) -> Response:
        from importlib.metadata import version

        return JSONResponse({"name": "optiserve", "version": version("optiserve"), "extensions": EXTENSIONS})

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    def readiness(c: ServingCore) -> Response:
        return Response(status_code=200) if c.ready else Response(status_code=503, headers=retry_headers())

    async def ready(request: Request) -> Response:
        return readiness(core())

    def check_model(c: ServingCore, request: Request) -> None:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name not in c.names:
            raise NotFound(f"no model {name!r} here; this server serves {c.names[0]!r} (or {c.names[1]!r})")
        if version is not None and version not in (c.spec.variant.id, TRITON_VERSION):
            raise NotFound(f"no version {version!r} of {name!r}; the served version is {c.spec.variant.id!r}")

    def model_document(document: Any) -> Any:
        """A GET route answering ``document(core)`` as JSON for a known model."""

        async def route(request: Request) -> Response:
            c = core()

            async def handler() -> Response:
                check_model(c, request)
                return Response(dumps(document(c)), media_type="application/json")

            return await c.answer("oip", handler, inference=False)

        return route

    async def model_ready(request: Request) -> Response:
        c = core()

        async def handler() -> Response:
            check_model(c, request)
            return readiness(c)

        return await c.answer("oip", handler, inference=False)

    async def predict(request: Request) -> Response:
        c = core()

        async def handler() -> Response:
            doc = load_object(await c.read_body(request))
            if "inputs" not in doc:
                raise InputValidationError(
                    'the body must be {"inputs": [[...], ...]} (samples on the first axis)'
                )
            try:
                array = native_array(doc["inputs"], c.input.dtype)
            except InvalidInput as e:  # the native API's schema: a body of the wrong form is a 400
                raise InputValidationError(e.message) from e
            result = await c.infer(c.check(array))
            return Response(dumps(result), media_type="application/json")

        return await c.answer("native", handler)

    async def infer(request: Request) -> Response:
        c = core()

        async def handler() -> Response:
            check_model(c, request)
            body = await c.read_body(request)
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            parsed = parse_request(body, content_type, request.headers.get(HEADER_LENGTH))
            outputs = await run_infer(c, parsed)
            payload, headers = encode_response(c.model.name, c.spec.variant.id, parsed.id, outputs)
            return Response(payload, headers=headers)

        return await c.answer("oip", handler)

    async def classify(request: Request) -> Response:
        c = core()

        async def handler() -> Response:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if c.raw_input != "image":
                raise UnsupportedMediaType(f"{c.model.name} does not classify images; use /v2 or /predict")
            if content_type not in IMAGE_TYPES:
                raise UnsupportedMediaType(
                    f"content type {content_type or 'none'!r}; expected image/jpeg or image/png"
                )
            logits = await c.infer(c.from_raw([await c.read_body(request)]))
            top = c.top_k(logits, 5)[0]
            return JSONResponse({"predictions": [{"label": lb, "index": i, "score": s} for s, i, lb in top]})

        return await c.answer("raw", handler)

    async def embed(request: Request) -> Response:
        c = core()

        async def handler() -> Response:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if c.raw_input != "text":
                raise UnsupportedMediaType(f"{c.model.name} does not embed text; use /v2 or /predict")
            if content_type != "text/plain":
                raise UnsupportedMediaType(f"content type {content_type or 'none'!r}; expected text/plain")
            vector = await c.infer(c.from_raw([await c.read_body(request)]))
            return JSONResponse({"embedding": vector[0].tolist()})

        return await c.answer("raw", handler)

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own 404/405 (unknown route or method), in the protocol's JSON error form."""
        assert isinstance(exc, HTTPException)
        text = {
            404: f"no route {request.url.path!r} here",
            405: f"{request.method} is not allowed on {request.url.path!r}",
        }
        body = {"error": text.get(exc.status_code, exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/classify", classify, methods=["POST"]),
        Route("/embed", embed, methods=["POST"]),
    ]
    for prefix in (model, versioned):
        routes += [
            Route(prefix, model_document(metadata), methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
            Route(prefix + "/config", model_document(model_config), methods=["GET"]),
            Route(prefix + "/stats", model_document(statistics), methods=["GET"]),
        ]

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    # A path no route matches is a JSON 404 naming it (as it was behind BentoML's router), not a
    # redirect to the path without its trailing slash.
    app.router.redirect_slashes = False
    return app


def statistics(c: ServingCore) -> dict[str, Any]:
    return c.stats.document(c.model.name, TRITON_VERSION)


def native_array(inputs: Any, dtype: str) -> np.ndarray:
    """``/predict``'s ``inputs`` (nested lists, samples first) → an array shaped by the nesting."""
    flat = tensor_from_json(inputs, oip_name(dtype), dtype, "inputs")
    shape: list[int] = []
    level = inputs
    while hasattr(level, "__len__") and not isinstance(level, (str, bytes)):
        shape.append(len(level))
        if not len(level):
            break
        level = level[0]
    if len(shape) < 2:
        raise InvalidInput("'inputs' must be a list of samples, each a list (nested lists, samples first)")
    return flat.reshape(shape)


def oip_name(dtype: str) -> str:
    return oip_datatype(dtype)


def metadata(c: ServingCore) -> dict[str, Any]:
    def tensor(name: str, dtype: str, shape: tuple[int | None, ...]) -> dict[str, Any]:
        return {
            "name": name,
            "datatype": oip_datatype(dtype),
            "shape": [-1 if d is None else d for d in shape],
        }

    doc: dict[str, Any] = {
        "name": c.model.name,
        "versions": [c.spec.variant.id],
        "platform": f"optiserve_{c.spec.runtime}",
        "inputs": [tensor(c.input.name, c.input.dtype, c.input.shape)],
        "outputs": [tensor(o.name, o.dtype, o.shape) for o in c.model.outputs]
        or [{"name": c.output_name, "datatype": "FP32", "shape": [-1]}],
        "parameters": {"variant": c.spec.variant.id, "precision": c.spec.variant.precision},
    }
    if c.raw_input:
        doc["parameters"]["raw_input"] = (
            f"a BYTES tensor [n] of {'JPEG/PNG images' if c.raw_input == 'image' else 'UTF-8 texts'}"
        )
    return doc


async def run_infer(c: ServingCore, request: InferRequest) -> list[tuple[OutputTensor, bool]]:
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected exactly one input ({c.input.name!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != c.input.name:
        raise InvalidInput(f"unknown input {tensor.name!r}; the model's input is {c.input.name!r}")
    if tensor.datatype == "BYTES":
        assert tensor.items is not None
        if len(tensor.shape) != 1:
            raise InvalidInput(
                f"input {tensor.name!r}: a BYTES input must have shape [n], got {list(tensor.shape)}"
            )
        array = c.from_raw(tensor.items)
    else:
        assert tensor.array is not None
        array = c.check(tensor.array)
    result = await c.infer(array)
    return _outputs(c, request, result)


def _outputs(c: ServingCore, request: InferRequest, result: np.ndarray) -> list[tuple[OutputTensor, bool]]:
    wanted = request.outputs or []
    for w in wanted:
        if w.name != c.output_name:
            raise InvalidInput(f"unknown output {w.name!r}; the model's output is {c.output_name!r}")
    spec = wanted[0] if wanted else None
    binary = spec.binary if spec is not None and spec.binary is not None else request.binary_output
    if spec is not None and spec.classification:
        rows = c.top_k(result, spec.classification)
        items = [f"{s:f}:{i}:{label}".encode() for row in rows for s, i, label in row]
        shape = (len(rows), len(rows[0]) if rows else 0)
        return [(OutputTensor(c.output_name, "BYTES", shape, items=items), binary)]
    datatype = oip_datatype(str(result.dtype))
    return [(OutputTensor(c.output_name, datatype, tuple(result.shape), array=result), binary)]
