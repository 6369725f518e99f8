"""Quantization-aware training (``qat-int8``): NNCF INT8 on the torch model, fine-tuned, exported as QDQ ONNX.

0. BatchNorms that follow a convolution are folded into it (``nn.Sequential`` models), so the INT8
   weights are the ones that run;
1. ``nncf.quantize`` inserts fake-quantizers (per-channel symmetric INT8 weights, per-tensor INT8
   activations) into the torch model and calibrates their ranges on ``ctx.calibration(...)``;
2. the quantized model is fine-tuned on the training set (:func:`._torch_train.fine_tune`), so the
   weights and the quantizers' ranges learn to live with INT8 rounding;
3. each quantizer is exported as an ONNX ``QuantizeLinear``/``DequantizeLinear`` pair (NNCF's own
   export mode, through torch's TorchScript-based exporter); each activation DequantizeLinear is then
   moved below the MaxPool/Flatten/Reshape it feeds, so ONNX Runtime fuses the pairs into INT8 kernels
   (``QLinearConv``, ``QGemm``) instead of running float ops between Q/DQ pairs.

Two NNCF settings are chosen for the export: the "overflow fix" (7-bit weights on the first layer, for
CPUs without VNNI) is off, since a 7-bit quantizer has no INT8 QDQ form; and NNCF's fake-quantize ops run
its torch reference implementation eagerly rather than a C++ extension compiled on first use (minutes,
a compiler, a lock file in ``~/.cache``) or a ``torch.compile``'d kernel: same numbers, no build step.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from optiserve.artifacts import ONNX_MODEL, load_torch_variant, parameter_count
from optiserve.errors import OptimizationError
from optiserve.types import ArtifactFormat, Variant

from .base import OptimizeContext, Optimizer, OptimizerConfig, Produced

if TYPE_CHECKING:
    import numpy as np
    import torch

LOG = "qat.json"
MIN_AGREEMENT = 0.95
"""Top-1 agreement the exported ONNX must reach with the fine-tuned torch model (catches broken exports)."""


class QatConfig(OptimizerConfig):
    epochs: int = Field(1, ge=1)
    samples: int | None = Field(10_000, ge=1)
    """Fine-tune on the first N training samples (None: all of them)."""
    lr: float = Field(1e-4, gt=0)
    """Adam's initial learning rate (cosine schedule to 0): small, the weights are already trained."""
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    preset: Literal["performance", "mixed"] = "performance"
    """NNCF preset: ``performance`` = symmetric activations, ``mixed`` = asymmetric activations."""
    calibration_samples: int | None = Field(None, ge=1)
    """At most this many calibration samples to initialise the quantizers (None: all the context gives)."""
    opset: int = Field(17, ge=13, le=17)
    """ONNX opset (13+ has per-channel QDQ; 17 is the newest the TorchScript exporter writes)."""


class QatInt8(Optimizer):
    name: ClassVar[str] = "qat-int8"
    tag: ClassVar[str] = "qat-int8"
    description: ClassVar[str] = "quantization-aware training with NNCF (torch) → INT8 QDQ ONNX"
    requires: ClassVar[tuple[str, ...]] = ("torch", "nncf", "onnx", "onnxruntime")
    extra: ClassVar[str] = "openvino"
    input_formats: ClassVar[tuple[ArtifactFormat, ...]] = ("torch",)
    output_format: ClassVar[ArtifactFormat | None] = "onnx"
    lossy: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    needs_training_data: ClassVar[bool] = True
    Config = QatConfig
    config: QatConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        from ._torch_train import fine_tune

        cfg = self.config
        spec = parent.model
        data = ctx.training(spec)
        if data is None:
            raise OptimizationError(
                f"{spec.name} has no labelled training set: quantization-aware training needs one",
                hint="use ort-int8-static or nncf-int8 (post-training) instead",
            )
        calibration = ctx.calibration(spec)[: cfg.calibration_samples]
        x, y = data[0][: cfg.samples], data[1][: cfg.samples]
        module = load_torch_variant(parent, parent_dir)
        started = time.perf_counter()
        quantized = self._quantize(_rooted(_fold_batchnorm(copy.deepcopy(module))), calibration)
        try:
            fine_tune(quantized, x, y, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed)
        except Exception as e:
            raise OptimizationError(f"quantization-aware training of {parent.id} failed: {e}") from e
        trained_s = time.perf_counter() - started
        path = out_dir / ONNX_MODEL
        in_name = spec.inputs[0].name
        out_name = spec.outputs[0].name if spec.outputs else "output"
        n_qdq = _export(quantized, calibration[:2], path, in_name, out_name, cfg.opset)
        agreement = _check(quantized, path, calibration)
        log = {
            "training_samples": len(x),
            "calibration_samples": len(calibration),
            "quantize_dequantize_pairs": n_qdq,
            "onnx_vs_torch_top1_agreement": agreement,
            "train_seconds": round(trained_s, 2),
        }
        (out_dir / LOG).write_text(json.dumps(log, indent=2) + "\n")
        return Produced(
            format="onnx",
            precision="int8",
            artifacts={"model": ONNX_MODEL, "log": LOG},
            parameters=parameter_count(module),
        )

    def _quantize(self, module: torch.nn.Module, calibration: np.ndarray) -> torch.nn.Module:
        import nncf
        import torch
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        _use_eager_reference_kernels()
        items = [torch.from_numpy(calibration[i : i + 16]) for i in range(0, len(calibration), 16)]
        preset = (
            nncf.QuantizationPreset.MIXED
            if self.config.preset == "mixed"
            else nncf.QuantizationPreset.PERFORMANCE
        )
        try:
            with _quiet():
                return nncf.quantize(  # type: ignore[no-any-return]
                    module,
                    nncf.Dataset(items),
                    preset=preset,
                    subset_size=len(items),
                    advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE),
                )
        except Exception as e:
            raise OptimizationError(f"NNCF could not quantize the torch model: {_first_line(e)}") from e


def _rooted(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a plain root module: NNCF adds its hook storage to the top module, which would
    otherwise become one more stage of an ``nn.Sequential``."""
    import torch

    class Root(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> Any:
            return self.model(x)

    return Root(model)


def _use_eager_reference_kernels() -> None:
    """Make NNCF run its reference fake-quantize functions eagerly on CPU (see the module docstring).

    NNCF looks the CPU functions up on a lazily loaded namespace; setting it before first use means
    nothing is compiled. Left alone when NNCF has already loaded one or its layout is not the expected.
    """
    try:
        from nncf.torch.quantization import extensions
        from nncf.torch.quantization.reference import torch_executor
    except ImportError:
        return

    class EagerReference:
        Quantize_forward = staticmethod(torch_executor.forward)
        Quantize_backward = staticmethod(torch_executor.backward)

    namespace = getattr(extensions, "QuantizedFunctionsCPU", None)
    if namespace is not None and getattr(namespace, "_loaded_namespace", "missing") is None:
        namespace._loaded_namespace = EagerReference


def _export(
    quantized: torch.nn.Module, example: np.ndarray, path: Path, in_name: str, out_name: str, opset: int
) -> int:
    """Export with every NNCF quantizer as a QuantizeLinear/DequantizeLinear pair; the number of pairs."""
    import onnx
    import torch
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    quantizers = [m for m in quantized.modules() if isinstance(m, BaseQuantizer)]
    if not quantizers:
        raise OptimizationError("NNCF inserted no quantizer: the model has no op it quantizes")
    for q in quantizers:
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    quantized.eval()
    try:
        with _quiet():
            torch.onnx.export(
                quantized,
                (torch.from_numpy(example),),
                str(path),
                input_names=[in_name],
                output_names=[out_name],
                opset_version=opset,
                dynamo=False,  # NNCF's QDQ export is a TorchScript symbolic
                dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
            )
        model = onnx.load(str(path))
        _sink_dequantize(model)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    except Exception as e:
        raise OptimizationError(
            f"ONNX export of the quantization-aware model failed: {_first_line(e)}"
        ) from e
    pairs = sum(1 for node in model.graph.node if node.op_type == "QuantizeLinear")
    if pairs == 0:
        raise OptimizationError(
            "the exported ONNX has no QuantizeLinear node: the INT8 export did not happen"
        )
    return pairs


def _fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm that directly follows a convolution in an ``nn.Sequential`` into its weights.

    Deployment folds them anyway; folding before quantization makes the INT8 weights the ones that
    run, and leaves ``DequantizeLinear → Conv → (Relu) → QuantizeLinear`` chains that ONNX Runtime fuses
    into ``QLinearConv``. Other module layouts are left as they are (still correct, just slower).
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for container in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = [name for name, _ in container.named_children()]
        for first, second in itertools.pairwise(names):
            conv, bn = container.get_submodule(first), container.get_submodule(second)
            if isinstance(conv, convs) and isinstance(bn, norms) and bn.track_running_stats:
                setattr(container, first, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(container, second, nn.Identity())
    return module.eval()


_SINKABLE = ("MaxPool", "Flatten", "Reshape")


def _sink_dequantize(model: Any) -> int:
    """Move each per-tensor ``DequantizeLinear`` below the MaxPool/Flatten/Reshape it feeds.

    NNCF quantizes an activation where it is produced (after a ReLU), so the export reads
    ``Q → DQ → MaxPool → Flatten → Gemm``; ONNX Runtime only fuses ``DQ → Gemm → Q`` into an INT8
    ``QGemm`` when the DQ is next to the Gemm. These ops commute with a per-tensor dequantization
    (a positive scale keeps the order, reshaping moves no value), so the result is numerically the same.
    Returns how many moves were made.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    scalar = {i.name for i in graph.initializer if numpy_helper.to_array(i).size == 1}
    scalar |= {
        n.output[0]
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and numpy_helper.to_array(n.attribute[0].t).size == 1
    }
    outputs = {o.name for o in graph.output}
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
    moved = 0
    while True:
        consumers: dict[str, list[int]] = {}
        for k, node in enumerate(nodes):
            for name in node.input:
                consumers.setdefault(name, []).append(k)
        for i, dq in enumerate(nodes):
            if (
                dq.op_type != "DequantizeLinear"
                or len(dq.input) < 2
                or dq.input[1] not in scalar
                or dq.output[0] in outputs
                or len(consumers.get(dq.output[0], [])) != 1
            ):
                continue
            j = consumers[dq.output[0]][0]
            op = nodes[j]
            if op.op_type not in _SINKABLE or j < i or op.input[0] != dq.output[0] or len(op.output) != 1:
                continue
            quantized, middle, result = dq.input[0], dq.output[0], op.output[0]
            op.input[0], op.output[0] = quantized, middle
            dq.input[0], dq.output[0] = middle, result
            nodes.insert(j, nodes.pop(i))  # the DQ now comes right after the op
            moved += 1
            break
        else:
            break
    del graph.node[:]
    graph.node.extend(nodes)
    return moved


def _check(quantized: torch.nn.Module, path: Path, samples: np.ndarray) -> float | None:
    """Run the ONNX on ONNX Runtime at two batch sizes; classifiers must agree with torch on top-1."""
    import numpy as np
    import onnxruntime as ort
    import torch

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        got = np.concatenate(
            [session.run(None, {name: samples[i : i + 64]})[0] for i in range(0, len(samples), 64)]
        )
        session.run(None, {name: samples[:1]})
    except Exception as e:
        raise OptimizationError(f"ONNX Runtime cannot run the INT8 model: {_first_line(e)}") from e
    with torch.inference_mode():
        expected = quantized(torch.from_numpy(samples)).numpy()
    if got.shape != expected.shape or not np.isfinite(got).all():
        raise OptimizationError(f"the INT8 ONNX outputs shape {got.shape}, torch {expected.shape}")
    if got.ndim != 2 or got.shape[1] < 2:
        return None
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    if agreement < MIN_AGREEMENT:
        raise OptimizationError(
            f"the INT8 ONNX agrees with the quantization-aware torch model on only {agreement:.1%} of "
            f"the calibration samples (at least {MIN_AGREEMENT:.0%} expected)"
        )
    return round(agreement, 4)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF progress bars and warnings, and the exporter deprecation notes: not the user's business."""
    noise = io.StringIO()
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
