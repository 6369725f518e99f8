"""The command line every peer server script takes, so the benchmark starts each the same way:
``MODEL --name NAME --port PORT --threads N`` (standard library only: each peer runs in its own venv)."""

from __future__ import annotations

import argparse


def parse_args(doc: str | None, model_required: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("model", nargs=None if model_required else "?", help="the ONNX file to serve")
    parser.add_argument("--name", required=model_required, default="m", help="the model's OIP name")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    return parser.parse_args()
