"""Every path of optiserve's protocols goes straight to optiserve's app, never through BentoML's router.

BentoML mounts an ``asgi_app`` passively at ``/``: its router first tries each of the app's routes
itself and hands the request over only when one matches. Two things follow, both fixed here:

- a path no route of ours matches got BentoML's plain-text 404 instead of the protocol's JSON
  ``{"error": ...}``. A catch-all ``/v2/{rest:path}`` route used to cover that, but Starlette's
  patterns (``.*``) stop at a newline, so ``GET /v2/models/m%0A/ready`` still fell through to the plain
  text. Now our router's own 404 and 405 answer, in JSON, and the catch-all is gone;
- every request was matched twice: BentoML's mount tried our routes (9 of them before an infer route)
  and then our router tried them again. Skipping that saves 0.03 ms of CPU a binary infer request
  (0.95 → 0.92 ms with a no-op model, 3 interleaved rounds).

This middleware is added with BentoML's public ``add_asgi_middleware``, so it runs inside BentoML's
traffic metrics, tracing, timeout and concurrency middlewares (they still see every request) and in
front of its router. It leaves out BentoML's per-request context (``bentoml.Context``, for
``@bentoml.api`` methods, which this service has none of) and BentoML's CORS middleware: a
cross-origin browser client of the protocol is not supported.
"""

from __future__ import annotations

from typing import Any

Scope = dict[str, Any]
ASGIApp = Any

PROTOCOL_PREFIXES = ("/v2/",)
PROTOCOL_PATHS = frozenset({"/v2", "/predict", "/classify", "/embed"})


def is_protocol_path(path: str) -> bool:
    """Whether optiserve's app owns ``path`` (the decoded path, as ASGI gives it)."""
    return path in PROTOCOL_PATHS or path.startswith(PROTOCOL_PREFIXES)


class ProtocolPathsFirst:
    """ASGI middleware: requests for the protocol's paths go to ``protocol_app``, the rest on to BentoML."""

    def __init__(self, app: ASGIApp, protocol_app: ASGIApp) -> None:
        self.app = app
        self.protocol_app = protocol_app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and is_protocol_path(scope["path"]):
            await self.protocol_app(scope, receive, send)
        else:
            await self.app(scope, receive, send)
