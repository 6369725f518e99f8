"""Post-quantization calibration passes for ONNX Runtime QDQ models (used by ``ort-int8-static``).

Not a plugin module (the leading underscore keeps the registry from scanning it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optiserve.errors import OptimizationError

from . import _onnx_common as common

if TYPE_CHECKING:
    import numpy as np
    import onnx


RANGE_CACHE = Path("cache") / "ort-calibration"
"""Calibrated activation ranges, under the workdir, one JSON file per :func:`range_cache_key`."""


def range_cache_key(parent_id: str, settings: dict[str, Any], samples: np.ndarray) -> str:
    """A key for the ranges ORT calibrates on ``samples`` for the parent with these calibration settings."""
    digest = hashlib.sha256(json.dumps([parent_id, settings], sort_keys=True).encode())
    digest.update(str((samples.shape, samples.dtype.str)).encode())
    digest.update(samples.tobytes())
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def range_cache(workdir: Path, key: str, ranges: Path) -> Iterator[None]:
    """Reuse ORT's calibration ranges across builds: ``ranges`` (the ``calibration_cache_path`` given to
    ``quantize_static``) starts as the cached copy when there is a readable one, and becomes the cached
    copy when the block succeeds (written aside, then renamed: never half-written)."""
    cached = workdir / RANGE_CACHE / f"{key}.json"
    hit = False
    if cached.is_file():
        try:
            json.loads(cached.read_text())
            shutil.copyfile(cached, ranges)
            hit = True
        except (OSError, ValueError):
            ranges.unlink(missing_ok=True)  # unreadable: calibrate again and replace it
    yield
    if not hit and ranges.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")  # builds may run side by side
        shutil.copyfile(ranges, partial)
        partial.replace(cached)


def quantized_layers(
    float_model: onnx.ModelProto, quant_model: onnx.ModelProto
) -> list[tuple[Any, Any, str]]:
    """The quantized Conv/Gemm nodes of ``quant_model`` with constant DequantizeLinear weights and
    int32 biases, as ``(node, bias DequantizeLinear, the float model's name for the node's output)``,
    in the float model's (topological) order: the quantizer does not keep the node order."""
    inits = {i.name for i in quant_model.graph.initializer}
    producer = {out: n for n in quant_model.graph.node for out in n.output}
    by_name = {n.name: n for n in quant_model.graph.node}

    def const_dq(name: str) -> Any:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return node if all(i in inits for i in node.input if i) else None

    layers = []
    for fnode in float_model.graph.node:
        node = by_name.get(fnode.name)
        if node is None or node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        bias_dq = const_dq(node.input[2])
        if const_dq(node.input[1]) is not None and bias_dq is not None:
            layers.append((node, bias_dq, fnode.output[0]))
    return layers


def empirical_bias_correction(
    float_path: Path, quant_path: Path, samples: np.ndarray, batch: int = 16
) -> int:
    """Make each quantized Conv/Gemm's mean output match the float model's, layer by layer in graph
    order, measured on ``samples`` run through the partially corrected quantized model (the empirical
    bias correction of Nagel et al., 2019, "Data-Free Quantization").

    Unlike the analytic correction of weight rounding, the measured error also holds what upstream
    activation quantization (clipped ranges, rounding through depthwise convolutions) shifts into the
    layer's output. Rewrites the int32 biases of ``quant_path`` in place; returns how many layers were
    corrected. Costs one pass over ``samples`` per layer.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    float_model, quant_model = common.load(float_path), common.load(quant_path)
    layers = quantized_layers(float_model, quant_model)
    if not layers:
        return 0
    outputs = [node.output[0] for node, _, _ in layers]
    reference = common.channel_means(float_path, [name for _, _, name in layers], samples, batch)
    inits = {i.name: i for i in quant_model.graph.initializer}
    # The biases become graph inputs so one session serves every step; exposing every layer's output
    # keeps each convolution computing from its quantized inputs, as the deployed model does.
    biases = {}
    for _, bias_dq, _ in layers:
        init = inits[bias_dq.input[0]]
        biases[init.name] = numpy_helper.to_array(init).copy()
        quant_model.graph.input.append(
            onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.INT32, list(init.dims))
        )
        quant_model.graph.initializer.remove(init)
    present = {o.name for o in quant_model.graph.output}
    for name in outputs:
        if name not in present:
            quant_model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = _session(quant_model, quant_path)
    input_name = float_model.graph.input[0].name
    for node, bias_dq, float_name in layers:
        bias_name = bias_dq.input[0]
        total: np.ndarray | float = 0.0
        for start in range(0, len(samples), batch):
            chunk = np.ascontiguousarray(samples[start : start + batch])
            (value,) = session.run([node.output[0]], {input_name: chunk, **biases})
            total = total + _channel_mean(value) * len(chunk)
        error = total / len(samples) - reference[float_name]
        scale = numpy_helper.to_array(inits[bias_dq.input[1]]).astype(np.float64)
        corrected = biases[bias_name].astype(np.float64) - error / scale
        biases[bias_name] = corrected.round().clip(-(2**31), 2**31 - 1).astype(np.int32)
    final = common.load(quant_path)
    for init in final.graph.initializer:
        if init.name in biases:
            init.CopyFrom(numpy_helper.from_array(biases[init.name], init.name))
    onnx.save(final, str(quant_path))
    return len(layers)


def _channel_mean(value: np.ndarray) -> np.ndarray:
    channel = 1 if value.ndim > 2 else value.ndim - 1
    return value.astype("float64").mean(axis=tuple(i for i in range(value.ndim) if i != channel))  # type: ignore[no-any-return]


def _session(model: onnx.ModelProto, path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(common.KEEP_FLOAT_OPTIMIZERS),
        )
    except Exception as e:
        raise OptimizationError(f"cannot expose the layers of {path.name}: {common.first_line(e)}") from e
