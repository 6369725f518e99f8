"""NNCF post-training INT8 quantization of an FP32 OpenVINO IR (``nncf-int8``).

NNCF inserts FakeQuantize ops (per-channel symmetric weights, per-tensor activations) calibrated on
``ctx.calibration(...)``; the OpenVINO CPU plugin then runs the quantized ops in INT8. Every NNCF knob
worth tuning is in :class:`~._openvino_common.NncfQuantizeConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from optiserve.errors import OptimizationError
from optiserve.types import Variant

from ._openvino_common import (
    NncfQuantizeConfig,
    NncfQuantizer,
    batches,
    first_line,
    nncf_advanced,
    nncf_quantize_kwargs,
    read_ir,
    save_quantized,
)
from .base import OptimizeContext, Produced


class NncfInt8(NncfQuantizer):
    name: ClassVar[str] = "nncf-int8"
    tag: ClassVar[str] = "nncf-int8"
    description: ClassVar[str] = "OpenVINO IR → INT8 with NNCF post-training quantization (calibrated)"
    Config = NncfQuantizeConfig
    config: NncfQuantizeConfig

    def produce(self, parent: Variant, parent_dir: Path, out_dir: Path, ctx: OptimizeContext) -> Produced:
        import nncf

        model = read_ir(parent, parent_dir)
        items = batches(ctx.calibration(parent.model), parent.model.inputs[0].fixed_batch)
        try:
            quantized = nncf.quantize(
                model,
                nncf.Dataset(items),
                **nncf_quantize_kwargs(self.config, len(items), model),
                advanced_parameters=nncf_advanced(self.config),
            )
        except Exception as e:
            raise OptimizationError(f"NNCF quantization of {parent.id} failed: {first_line(e)}") from e
        return save_quantized(quantized, out_dir, parent)
