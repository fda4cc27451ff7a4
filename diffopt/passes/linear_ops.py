"""Graph helpers for passes that rewrite linear ops (``aten.linear``, ``aten.conv1d/2d``):
which ops are eligible, how to call one with other operands, integer (A8W8) arithmetic, and
the statically quantized form of an op (``quantize_op``, used by static quantization and
by temporal differences), and int8 weight columns for Q/DQ matrix products.

Integer arithmetic keeps codes in float64: products of int8 codes summed over any
realistic reduction stay far below 2**53, so float64 accumulation is exact and the
same in every order: an integer identity holds bit for bit, not within a tolerance.
"""

from __future__ import annotations

import torch
from torch import fx

from diffopt.ir.annotations import NodeAnnotation, annotate
from diffopt.ir.graph_tools import attribute
from diffopt.ir.layers import op_name
from diffopt.quant.arithmetic import insert_quantize, quantize_weight_per_channel
from diffopt.quant.ops import insert_dequantize_weight, insert_fake_quantize

aten = torch.ops.aten
WEIGHT_BITS = 8
WEIGHT_FORMS = ("integer", "qdq")  # A8W8 arithmetic: exact float64 integer emulation, or Q/DQ operators


def call_like(
    graph: fx.Graph, op: fx.Node, activation: fx.Node, weight: fx.Node, bias: fx.Node | None = None
) -> fx.Node:
    """``op`` (linear or conv, same stride/padding/...) applied to other operands."""
    return graph.call_function(op.target, (activation, weight, bias, *op.args[3:]), dict(op.kwargs))


def constant(module: fx.GraphModule, graph: fx.Graph, name: str, value: torch.Tensor) -> fx.Node:
    """A ``get_attr`` of buffer ``name`` (registered on ``module`` if it is not yet)."""
    if not hasattr(module, name):
        module.register_buffer(name, value)
    return graph.get_attr(name)


def to_dtype(graph: fx.Graph, value: fx.Node, dtype: torch.dtype) -> fx.Node:
    return graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})


def output_broadcast_shape(op: fx.Node, channels: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-output-channel vector over the op's output."""
    return (channels, *[1] * {"linear": 0, "conv1d": 1, "conv2d": 2}[op_name(op)])


class IntegerLinear:
    """The A8W8 form of one linear op: int8 per-output-channel weight codes and a static
    activation scale. ``accumulate(codes) = op(codes, W_codes)`` exactly (float64);
    ``dequantize(acc) = acc * s_x * s_w + bias`` in the op's dtype. Built once from the
    op; the graph methods take the op's node in the variant being edited."""

    def __init__(self, module: fx.GraphModule, op: fx.Node, activation_scale: float, prefix: str):
        weight = attribute(module, op.args[1].target)
        codes, weight_scale = quantize_weight_per_channel(weight, WEIGHT_BITS)
        self.shape = output_broadcast_shape(op, weight.shape[0])
        self.weight_codes = codes.double()
        self.output_scale = (weight_scale.double() * activation_scale).reshape(self.shape)
        self.dtype = weight.dtype
        self.prefix = prefix

    def accumulate(self, module: fx.GraphModule, graph: fx.Graph, op: fx.Node, codes64: fx.Node) -> fx.Node:
        weight = constant(module, graph, f"{self.prefix}_weight_codes", self.weight_codes)
        return call_like(graph, op, codes64, weight)

    def dequantize(self, module: fx.GraphModule, graph: fx.Graph, op: fx.Node, accumulator: fx.Node) -> fx.Node:
        scale = constant(module, graph, f"{self.prefix}_output_scale", self.output_scale)
        value = to_dtype(graph, graph.call_function(aten.mul.Tensor, (accumulator, scale)), self.dtype)
        bias = op.args[2] if len(op.args) > 2 else None
        if bias is None:
            return value
        return graph.call_function(
            aten.add.Tensor, (value, graph.call_function(aten.view.default, (bias, list(self.shape))))
        )


def int8_weight_columns(module: fx.GraphModule, op: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes K x N, scale per column) of linear op ``op``'s weight: the right operand
    of ``x @ W8`` as a MatMul reads it (no transpose), one scale per output channel."""
    weight = attribute(module, op.args[1].target)
    codes, scale = quantize_weight_per_channel(weight, WEIGHT_BITS)
    return codes.t().contiguous().to(torch.int8), scale.to(weight.dtype)


def _qdq_linear(
    module: fx.GraphModule, op: fx.Node, activation: fx.Node, layer: str, prefix: str
) -> tuple[fx.Node, fx.Node]:
    """(the product, the result) of ``activation @ DequantizeLinear(W8, s_w) + b``: linear op
    ``op`` with its weight as int8 codes per output channel, the form TensorRT's explicit
    quantization and OpenVINO's low-precision transformations turn into integer GEMMs."""
    graph = module.graph
    codes, scale = int8_weight_columns(module, op)
    weight = insert_dequantize_weight(
        graph,
        constant(module, graph, f"{prefix}_weight_codes", codes),
        constant(module, graph, f"{prefix}_weight_scale", scale),
        layer,
    )
    matmul = graph.call_function(aten.matmul.default, (activation, weight))
    bias = op.args[2] if len(op.args) > 2 else None
    return matmul, matmul if bias is None else graph.call_function(aten.add.Tensor, (matmul, bias))


def operand_bits(activation_bits: int | str, weight_bits: int, code_scale: float = 1.0) -> dict:
    """Annotation details cost accounting reads: operand widths of a matmul. ``"codes"``:
    the activation holds integer codes times ``code_scale``; their widths are counted at run time."""
    return {"activation_bits": activation_bits, "weight_bits": weight_bits, "code_scale": code_scale}


def quantize_op(
    module: fx.GraphModule,
    op: fx.Node,
    layer: str,
    scale: float,
    activation_bits: int,
    weight_bits: int | None,
    prefix: str,
    owner: str,
    mode: str = "quantized",
    reason: str | None = None,
    weight_form: str = "integer",
) -> None:
    """Replace linear op ``op`` by its statically quantized form (``passes.static_quantization``
    describes it): fake-quantized activations, or integer codes with A8W8 arithmetic
    (``weight_form="integer"``), or both operands as Q/DQ (``"qdq"``, linear ops; a
    convolution keeps float weights)."""
    graph = module.graph
    with graph.inserting_before(op):
        if weight_bits is not None and weight_form == "qdq" and op_name(op) == "linear":
            activation = insert_fake_quantize(graph, op.args[0], scale, activation_bits, layer)
            (matmul, result), bits = _qdq_linear(module, op, activation, layer, prefix), operand_bits(8, WEIGHT_BITS)
        elif weight_bits is None or weight_form == "qdq":
            matmul = call_like(
                graph,
                op,
                insert_fake_quantize(graph, op.args[0], scale, activation_bits, layer),
                op.args[1],
                op.args[2] if len(op.args) > 2 else None,
            )
            result, bits = matmul, operand_bits(activation_bits, 32)
        else:
            codes = insert_quantize(graph, op.args[0], scale, activation_bits)
            integer = IntegerLinear(module, op, scale, prefix)
            matmul = integer.accumulate(module, graph, op, to_dtype(graph, codes, torch.float64))
            result, bits = integer.dequantize(module, graph, op, matmul), operand_bits("codes", 8)
    annotate(matmul, NodeAnnotation(mode, owner, reason=reason, bits=activation_bits, details={"layer": layer, **bits}))
    op.replace_all_uses_with(result)
    graph.erase_node(op)
