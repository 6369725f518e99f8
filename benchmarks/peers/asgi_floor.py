"""The transport floor: a bare ASGI app on the HTTP server BentoML runs (uvicorn with httptools and
uvloop) that reads an infer request's whole body and answers a fixed 1000-float binary response, with no
model, no parsing and no middleware. Its latency at concurrency 1 is what HTTP alone costs a request of
that size on this machine, measured in the same run as the servers it is compared with.

    python benchmarks/peers/asgi_floor.py --name NAME --port 8080
"""

from __future__ import annotations

import json
from typing import Any

from peer_cli import parse_args

OUTPUT = json.dumps(
    {
        "outputs": [
            {
                "name": "output",
                "datatype": "FP32",
                "shape": [1, 1000],
                "parameters": {"binary_data_size": 4000},
            }
        ]
    }
).encode()
RESPONSE = OUTPUT + bytes(4000)
HEADERS = [
    (b"content-type", b"application/octet-stream"),
    (b"inference-header-content-length", str(len(OUTPUT)).encode()),
    (b"content-length", str(len(RESPONSE)).encode()),
]
EMPTY = [(b"content-length", b"0")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    post = scope["method"] == "POST"
    status = 200 if post or scope["path"].endswith("/ready") else 404
    await send({"type": "http.response.start", "status": status, "headers": HEADERS if post else EMPTY})
    await send({"type": "http.response.body", "body": RESPONSE if post else b""})


def main() -> None:
    import uvicorn

    args = parse_args(__doc__, model_required=False)  # the model is not served: the same command line
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", log_level="warning")


if __name__ == "__main__":
    main()
