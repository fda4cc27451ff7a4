"""Static per-layer activation quantization: the plain int8 baselines Ditto is measured against.

Before: ``y = op(x, W, b)`` for every Linear / Conv with a parameter weight.
After, ``weight_bits=8`` (A8W8): ``c = Q(x; s_x)``, ``y = op(c, W_c) * s_x * s_w + b`` with
int8 weight codes per output channel and exact integer accumulation (float64);
``weight_bits=None`` (A8, fp weights): ``y = op(Q(x; s_x) * s_x, W, b)``. ``s_x`` is one static
scale per layer from calibration (``quant.symmetric_scale`` of ``TemporalStatistics.input_range``). The
policy can exclude layers (``{"quantize": False}``), and ``float_ends=True`` keeps the
first and the last linear layer of the full variant in float (the patch or input projection
and the output projection, where int8 error shows most). A8 exports as QuantizeLinear /
DequantizeLinear with constant scales (``quantized_ops.fake_quantize``). A8W8 has two forms:
``weight_form="integer"``, float64 integer emulation for verification in torch, which does
not export; ``weight_form="qdq"``, ``y = DQ(Q(x; s_x)) @ DQ(W_c; s_w) + b`` for linear ops
(convolutions keep float weights): the Q/DQ graph of a bundle in precision ``int8-static``,
which TensorRT's explicit quantization and OpenVINO's low-precision kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from diffopt.ir.annotations import NodeAnnotation, annotate, annotation_of
from diffopt.ir.graph_tools import remove_dead_code
from diffopt.ir.layers import linear_layers, op_name
from diffopt.ir.program import StepProgram
from diffopt.ir.specs import FULL
from diffopt.passes.base import GraphPass, PassContext, PassResult, register_pass
from diffopt.passes.linear_ops import WEIGHT_BITS, WEIGHT_FORMS, quantize_op
from diffopt.quant.arithmetic import symmetric_scale

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class StaticQuantizationPass(GraphPass):
    activation_bits: int = 8
    weight_bits: int | None = WEIGHT_BITS  # None: keep float weights (activation-only quantization)
    weight_form: str = "integer"  # one of WEIGHT_FORMS (module docstring)
    float_ends: bool = False  # keep the first and the last linear layer in float

    def __post_init__(self) -> None:
        if self.weight_bits not in (None, WEIGHT_BITS):
            raise ValueError(f"weight_bits must be {WEIGHT_BITS} or None, found {self.weight_bits}")
        if self.weight_form not in WEIGHT_FORMS:
            raise ValueError(f"weight_form must be one of {WEIGHT_FORMS}, found {self.weight_form!r}")
        if self.weight_bits is not None and self.activation_bits != 8:
            raise ValueError("integer accumulation (weight_bits=8) is implemented for 8-bit activations only")

    @property
    def needs_calibration(self) -> bool:
        return True

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        statistics = context.require_statistics(self.name).temporal
        modified = False
        ends = self._float_ends(program)
        for module in program.variants.values():
            graph = module.graph
            for index, (op, layer) in enumerate(linear_layers(graph).items()):
                if _quantized(op):
                    continue  # quantized by an earlier pass (or by this one: a second run changes nothing)
                excluded = context.policy.resolve(layer, op_name(op)).get("quantize", True) is False
                if excluded or layer in ends:
                    if annotation_of(op) is None:
                        reason = "excluded by the layer policy" if excluded else "first or last layer (float_ends)"
                        annotate(op, NodeAnnotation("original", self.name, reason=reason))
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
                    weight_form=self.weight_form,
                )
                modified = True
            remove_dead_code(module)
        return PassResult(program, modified)

    def _float_ends(self, program: StepProgram) -> set[str]:
        if not self.float_ends:
            return set()
        layers = list(linear_layers(program.variants[FULL].graph).values())
        return {layers[0], layers[-1]} if layers else set()


INT8_STATIC = StaticQuantizationPass(weight_form="qdq", float_ends=True)  # what bundle precision int8-static runs


def _quantized(op: fx.Node) -> bool:
    """Whether a pass already quantized ``op`` (or this pass left it alone on purpose)."""
    annotation = annotation_of(op)
    return annotation is not None and (
        annotation.bits is not None or annotation.owner == StaticQuantizationPass.__name__
    )
