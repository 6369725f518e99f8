"""Turn what the user typed (``--model``) into a ModelSpec, and give each model its module and data.

Accepted forms, checked in this order:
  * a built-in name (``optiserve models`` lists them),
  * a path to an ``.onnx`` file (its inputs are read from the graph),
  * ``package.module:callable`` returning a torch ``nn.Module`` (needs ``input_shape`` in the config).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from optiserve.errors import ModelError
from optiserve.fsutil import sha256_file
from optiserve.ids import slug
from optiserve.models.base import BuiltinModel, Split
from optiserve.types import DType, ModelSpec, TensorSpec

if TYPE_CHECKING:
    import numpy as np
    import torch

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_ONNX_DTYPES: dict[int, DType] = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8"}


def resolve_model(
    ref: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: DType = "float32",
    input_name: str = "input",
    name: str | None = None,
) -> ModelSpec:
    builtins = BuiltinModel.registry()
    if ref in builtins:
        model = builtins[ref]
        model.require_available()
        spec = model.spec()
        if spec.labels is None and model.labels() is not None:
            spec = spec.model_copy(update={"labels": tuple(model.labels() or ())})
        return spec
    if ref.endswith(".onnx") or Path(ref).is_file() or "/" in ref:
        return _onnx_spec(Path(ref), name, input_shape)
    if _CALLABLE.match(ref):
        if input_shape is None:
            raise ModelError(
                f"model {ref!r} is a module:callable, so its input shape must be given",
                hint="set model.input_shape in the config, e.g. [3, 224, 224] (per sample, no batch axis)",
            )
        return ModelSpec(
            name=slug(name or ref.split(":")[-1]),
            source="torch-callable",
            ref=ref,
            inputs=(TensorSpec(name=input_name, dtype=input_dtype, shape=(None, *input_shape)),),
        )
    raise ModelError(
        f"unknown model {ref!r}",
        hint=f"use a built-in ({', '.join(builtins)}), a path to an .onnx file, or module:callable",
    )


def _onnx_spec(path: Path, name: str | None, input_shape: tuple[int, ...] | None) -> ModelSpec:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file (expected an .onnx file)")
    try:
        import onnx
    except ImportError as e:
        raise ModelError(
            "reading an ONNX model needs the onnx package", hint="pip install 'optiserve[onnx]'"
        ) from e
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path} is not a valid ONNX model: {first[:200]}") from e
    initializers = {init.name for init in proto.graph.initializer}
    inputs = tuple(_tensor_spec(v, _ONNX_DTYPES) for v in proto.graph.input if v.name not in initializers)
    outputs = tuple(_tensor_spec(v, _ONNX_DTYPES) for v in proto.graph.output)
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} inputs; optiserve serves single-input models for now")
    inp = inputs[0]
    if input_shape is not None:
        if len(input_shape) != len(inp.shape) - 1:
            raise ModelError(
                f"input_shape {list(input_shape)} has {len(input_shape)} axes; {path.name}'s input "
                f"{inp.name!r} has {len(inp.shape) - 1} besides the batch axis"
            )
        inputs = (inp.model_copy(update={"shape": (inp.shape[0], *input_shape)}),)
    elif any(d is None for d in inp.shape[1:]):
        raise ModelError(
            f"{path.name}'s input {inp.name!r} has dynamic axes besides the batch axis "
            f"({_show(inp.shape)}); give the per-sample shape with --input-shape"
        )
    return ModelSpec(
        name=slug(name or path.stem),
        source="onnx",
        ref=str(path.resolve()),
        inputs=inputs,
        outputs=outputs,
        sha256=sha256_file(path),
    )


def _tensor_spec(value: object, dtypes: dict[int, DType]) -> TensorSpec:
    ttype = value.type.tensor_type  # type: ignore[attr-defined]
    if ttype.elem_type not in dtypes:
        raise ModelError(f"ONNX tensor {value.name!r} has element type {ttype.elem_type}, not supported")  # type: ignore[attr-defined]
    # A named or missing dimension is dynamic; a fixed batch dimension is kept (it limits batching).
    dims = [
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim
    ]
    return TensorSpec(name=value.name, dtype=dtypes[ttype.elem_type], shape=tuple(dims))  # type: ignore[attr-defined]


def _show(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def build_torch_module(spec: ModelSpec) -> torch.nn.Module:
    """The FP32 torch module of a built-in or ``module:callable`` model, in eval mode."""
    if spec.source == "builtin":
        return BuiltinModel.get(spec.ref).build()
    if spec.source == "torch-callable":
        import torch

        module_name, attr = spec.ref.split(":")
        # Like `python -m`, look in the current directory first (console scripts do not put it on sys.path).
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ModelError(f"cannot import {spec.ref}: {e}", hint="is the module on PYTHONPATH?") from e
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"{spec.ref} returned {type(model).__name__}, expected a torch.nn.Module")
        return model.eval()
    raise ModelError(f"model {spec.name} comes from an ONNX file and has no torch module")


def targets(spec: ModelSpec, split: Split, n: int) -> np.ndarray | None:
    """Labels for the first ``n`` samples of ``dataset(spec, split, n)``, when the model has them."""
    if spec.source != "builtin":
        return None
    return BuiltinModel.get(spec.ref).targets(split, n)


def training_data(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray] | None:
    if spec.source != "builtin":
        return None
    return BuiltinModel.get(spec.ref).training_data()


def stress_dataset(spec: ModelSpec, n: int) -> np.ndarray | None:
    """A built-in's unlabelled stress set (agreement only), or None."""
    if spec.source != "builtin" or n < 1:
        return None
    return BuiltinModel.get(spec.ref).stress_dataset(n)


def dataset(spec: ModelSpec, split: Split, n: int) -> tuple[np.ndarray, str]:
    """(samples, description). Built-ins give real data; other models get seeded synthetic inputs."""
    import numpy as np

    if spec.source == "builtin":
        model = BuiltinModel.get(spec.ref)
        data = model.dataset(split, n)
        return data, model.describe_data(split, len(data))
    inp = spec.inputs[0]
    rng = np.random.default_rng(0 if split == "eval" else 1)
    shape = (n, *inp.sample_shape)
    if inp.dtype.startswith("float"):
        data = rng.standard_normal(shape).astype(inp.dtype)
    else:
        data = rng.integers(0, 100, size=shape).astype(inp.dtype)
    return data, f"{n} synthetic samples (seeded normal; {spec.name} has no built-in dataset)"
