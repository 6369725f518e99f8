"""Students for knowledge distillation: a built-in model's own ``student(width)``, or a width-scaled copy.

The generic student keeps the teacher's layer sequence and module names and multiplies the output
channel count of every hidden Conv/Linear by ``width`` (the last one keeps the class count), then
adjusts what follows: BatchNorm sizes, the next layer's input channels, depthwise groups, and the
first Linear after a Flatten (its inputs are channels × positions). It works on models built from
``nn.Sequential`` (nested ones too) of standard layers; anything else needs a ``student(width)``
classmethod on the built-in model, returning a module with the model's layer names and other layer
sizes (``architecture.json`` records replaced layers by path), or None to use the generic student.
The student's weights are freshly initialised (seeded by the caller).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from optiserve.errors import OptimizationError

if TYPE_CHECKING:
    from torch import nn

    from optiserve.types import ModelSpec


def student_for(spec: ModelSpec, teacher: nn.Module, width: float) -> tuple[nn.Module, str]:
    """(untrained student, how it was made): the built-in model's ``student(width)`` when it defines one."""
    if spec.source == "builtin":
        from optiserve.models.base import BuiltinModel

        hook = getattr(BuiltinModel.get(spec.ref), "student", None)
        if callable(hook):
            try:
                module = hook(width)
            except Exception as e:
                raise OptimizationError(f"{spec.name}.student(width={width}) failed: {e}") from e
            if module is not None:  # None: the model leaves it to the generic student
                return module, f"{spec.name}.student(width={width})"
    return width_scaled(teacher, width), f"width-scaled copy of the teacher (width {width})"


def width_scaled(teacher: nn.Module, width: float) -> nn.Module:
    """A copy of ``teacher`` with every hidden Conv/Linear ``width`` times as wide, freshly initialised."""
    from torch import nn

    if not 0.0 < width <= 1.0:
        raise OptimizationError(f"student width must be in (0, 1], got {width}")
    if not isinstance(teacher, nn.Sequential):
        raise OptimizationError(
            f"cannot derive a student from a {type(teacher).__name__} generically (only nn.Sequential "
            "models of standard layers); give the built-in model a student(width) classmethod"
        )
    weighted = [m for m in _leaves(teacher) if isinstance(m, _kinds().weighted)]
    if not weighted:
        raise OptimizationError("the teacher has no Conv or Linear layer to make narrower")
    state = _State(last=weighted[-1], width=width)
    return _rebuild(teacher, state, "")


class _State:
    """Channel counts flowing through the teacher (``old``) and the student (``new``) at one point."""

    def __init__(self, last: nn.Module, width: float) -> None:
        self.last = last
        self.width = width
        self.old: int | None = None  # None: the model input, never resized
        self.new: int | None = None
        self.flattened = False  # after a Flatten that follows a conv: features = channels × positions

    def scaled_in(self, n_in: int, where: str) -> int:
        if self.old is None or self.new is None:
            return n_in
        if self.flattened:
            if n_in % self.old:
                raise OptimizationError(
                    f"{where}: {n_in} input features are not a multiple of the {self.old} channels before "
                    "the Flatten; give the built-in model a student(width) classmethod"
                )
            return n_in // self.old * self.new
        if n_in != self.old:
            raise OptimizationError(
                f"{where} takes {n_in} channels but receives {self.old}: the model is not a plain sequence "
                "of layers; give the built-in model a student(width) classmethod"
            )
        return self.new

    def scaled_out(self, module: nn.Module, n_out: int) -> int:
        return n_out if module is self.last else max(1, round(n_out * self.width))

    def advance(self, old: int, new: int) -> None:
        self.old, self.new, self.flattened = old, new, False


def _rebuild(module: nn.Module, state: _State, path: str) -> nn.Module:
    from collections import OrderedDict

    from torch import nn

    kinds = _kinds()
    if isinstance(module, nn.Sequential):
        children = OrderedDict(
            (name, _rebuild(child, state, f"{path}.{name}" if path else name))
            for name, child in module.named_children()
        )
        return nn.Sequential(children)
    where = f"layer {path} ({type(module).__name__})"
    if isinstance(module, kinds.convs):
        return _conv(module, state, where)
    if isinstance(module, nn.Linear):
        n_in = state.scaled_in(module.in_features, where)
        n_out = state.scaled_out(module, module.out_features)
        state.advance(module.out_features, n_out)
        return nn.Linear(n_in, n_out, bias=module.bias is not None)
    if isinstance(module, kinds.norms):
        if state.old is not None and module.num_features != state.old:
            raise OptimizationError(f"{where} normalises {module.num_features} channels, not {state.old}")
        options = {"bias": module.bias is not None} if "bias" in _norm_options(type(module)) else {}
        return type(module)(
            state.new if state.new is not None else module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            **options,
        )
    if isinstance(module, nn.Flatten):
        state.flattened = state.old is not None
        return copy.deepcopy(module)
    if isinstance(module, kinds.stateless) and not any(True for _ in module.parameters()):
        return copy.deepcopy(module)
    raise OptimizationError(
        f"{where} is not a layer the generic student knows how to resize; give the built-in model a "
        "student(width) classmethod"
    )


def _conv(module: nn.Module, state: _State, where: str) -> nn.Module:
    conv: nn.Conv2d = module  # type: ignore[assignment]  # any _ConvNd: the same attributes
    if state.flattened:
        raise OptimizationError(f"{where} follows a Flatten; the generic student cannot resize it")
    n_in = state.scaled_in(conv.in_channels, where)
    if conv.groups == 1:
        groups, n_out = 1, state.scaled_out(conv, conv.out_channels)
    elif conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0:
        groups = n_in  # depthwise: one group per channel, the same channel multiplier
        n_out = n_in * (conv.out_channels // conv.in_channels)
    else:
        raise OptimizationError(f"{where} is a grouped convolution ({conv.groups} groups); cannot resize it")
    state.advance(conv.out_channels, n_out)
    return type(conv)(
        n_in,
        n_out,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _norm_options(cls: type) -> frozenset[str]:
    """Keyword arguments a norm class takes (newer torch versions add ``bias``)."""
    import inspect

    return frozenset(inspect.signature(cls).parameters)


def _leaves(module: nn.Module) -> list[nn.Module]:
    from torch import nn

    if isinstance(module, nn.Sequential):
        return [leaf for child in module.children() for leaf in _leaves(child)]
    return [module]


@dataclass(frozen=True)
class _Kinds:
    weighted: tuple[type, ...]
    convs: tuple[type, ...]
    norms: tuple[type, ...]
    stateless: tuple[type, ...]


@functools.cache
def _kinds() -> _Kinds:
    """The layer classes the generic student handles (built on first use: torch stays out of imports)."""
    from torch import nn

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return _Kinds(
        weighted=(*convs, nn.Linear),
        convs=convs,
        norms=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        stateless=(
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
            nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
            nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
            nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
        ),
    )  # fmt: skip
