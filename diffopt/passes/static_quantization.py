"""Static per-layer activation quantization: the plain int8 baselines Ditto is measured against.

Before: ``y = op(x, W, b)`` for every Linear / Conv with a parameter weight.
After, ``weight_bits=8`` (A8W8): ``c = Q(x; s_x)``, ``y = op(c, W_c) * s_x * s_w + b`` with
int8 weight codes per output channel and exact integer accumulation (float64);
``weight_bits=None`` (A8, fp weights): ``y = op(Q(x; s_x) * s_x, W, b)``. ``s_x`` is one static
scale per layer from calibration (``quant.symmetric_scale`` of ``TemporalStatistics.input_range``). The
policy can exclude layers (``{"quantize": False}``). A8 exports as QuantizeLinear /
DequantizeLinear with constant scales (``quantized_ops.fake_quantize``); A8W8's float64
integer emulation is for verification in torch and does not export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from diffopt.ir.annotations import NodeAnnotation, annotate, annotation_of
from diffopt.ir.graph_tools import remove_dead_code
from diffopt.ir.layers import linear_layers, op_name
from diffopt.ir.program import StepProgram
from diffopt.passes.base import GraphPass, PassContext, PassResult, register_pass
from diffopt.passes.linear_ops import WEIGHT_BITS, quantize_op
from diffopt.quant.arithmetic import symmetric_scale

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class StaticQuantizationPass(GraphPass):
    activation_bits: int = 8
    weight_bits: int | None = WEIGHT_BITS  # None: keep float weights (activation-only quantization)

    def __post_init__(self) -> None:
        if self.weight_bits not in (None, WEIGHT_BITS):
            raise ValueError(f"weight_bits must be {WEIGHT_BITS} or None, found {self.weight_bits}")
        if self.weight_bits is not None and self.activation_bits != 8:
            raise ValueError("integer accumulation (weight_bits=8) is implemented for 8-bit activations only")

    @property
    def needs_calibration(self) -> bool:
        return True

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        statistics = context.require_statistics(self.name).temporal
        modified = False
        for module in program.variants.values():
            graph = module.graph
            for index, (op, layer) in enumerate(linear_layers(graph).items()):
                if _quantized(op):
                    continue  # quantized by an earlier pass (or by this one: a second run changes nothing)
                if context.policy.resolve(layer, op_name(op)).get("quantize", True) is False:
                    if annotation_of(op) is None:
                        annotate(op, NodeAnnotation("original", self.name, reason="excluded by the layer policy"))
                        modified = True
                    continue
                quantize_op(
                    module,
                    op,
                    layer,
                    symmetric_scale(statistics.input_range(layer), self.activation_bits),
                    self.activation_bits,
                    self.weight_bits,
                    f"a8w8_{index}",
                    self.name,
                )
                modified = True
            remove_dead_code(module)
        return PassResult(program, modified)


def _quantized(op: fx.Node) -> bool:
    """Whether a pass already quantized ``op`` (or this pass left it alone on purpose)."""
    annotation = annotation_of(op)
    return annotation is not None and (
        annotation.bits is not None or annotation.owner == StaticQuantizationPass.__name__
    )
