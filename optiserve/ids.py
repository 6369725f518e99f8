"""Content-derived, readable variant ids: ``efficientnet-lite0.onnx.3fa2c1``.

The hash covers the parent id, the optimizer and its config, so the same chain on the same model
always gives the same id, and any change to either gives a new one.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_SLUG = re.compile(r"[^a-z0-9-]+")


def slug(text: str) -> str:
    """Lower-case, dash-separated: safe for Bento tags, Helm names and Prometheus label values."""
    return _SLUG.sub("-", text.lower()).strip("-") or "x"


def content_hash(payload: Any, length: int = 6) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def variant_id(model_name: str, tags: list[str], lineage: Any) -> str:
    """``<model>.<tag>.<tag>...<hash>``; the hash is of the whole lineage, not of the readable part."""
    parts = [slug(model_name), *(slug(t) for t in tags), content_hash(lineage)]
    return ".".join(parts)
