"""Torch custom ops for the quantize/dequantize steps that must reach ONNX as Q/DQ operators.

Passes insert these ops instead of elementwise arithmetic, so that ``torch.onnx.export``
(given ``ONNX_TRANSLATIONS``) emits the operators onnxruntime and TensorRT recognise:

- ``diffopt::dynamic_fake_quantize(x)`` -> ``DequantizeLinear(DynamicQuantizeLinear(x))``:
  uint8 codes with a scale computed per call, ``(max(x, 0) - min(x, 0)) / 255``, and zero
  point ``round(-min(x, 0) / scale)``. The torch kernel repeats onnxruntime's arithmetic
  step by step (same float32 operations, round half to even), so both give the same values.
- ``diffopt::dequantize_weight(codes, scale)`` -> ``DequantizeLinear(codes, scale, axis=1)``:
  int8 weight codes stored K x N (the right operand of a MatMul), one scale per column.
  onnxruntime fuses ``DynamicQuantizeLinear -> DequantizeLinear -> MatMul`` whose other
  operand is this (an int8 initializer, no Transpose) into ``MatMulIntegerToFloat`` or
  ``DynamicQuantizeMatMul``: a uint8 x int8 integer GEMM.
- ``diffopt::fake_quantize(x, scale, bits)`` -> static symmetric quantization with zero
  point 0 (``quantization.quantize`` times ``scale``). 8 bits: ``Clip`` to +-127 codes,
  ``QuantizeLinear`` / ``DequantizeLinear`` with a constant scale and an int8 zero point 0,
  the form TensorRT's Quantize layer builds from; other widths: Div/Round/Clip/Mul.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from diffopt.quant.arithmetic import largest_code, quantize

UINT8_LEVELS = 255
INT8 = 3  # onnx.TensorProto.INT8


@torch.library.custom_op("diffopt::dynamic_fake_quantize", mutates_args=())
def dynamic_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = torch.where(high == low, torch.ones_like(high), (high - low) / UINT8_LEVELS)
    zero_point = torch.clamp(torch.round(-low / scale), 0, UINT8_LEVELS)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, UINT8_LEVELS)
    return (codes - zero_point) * scale


@dynamic_fake_quantize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("diffopt::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale


@dequantize_weight.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=scale.dtype, device=codes.device)


@torch.library.custom_op("diffopt::fake_quantize", mutates_args=())
def fake_quantize(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    return quantize(x, scale, bits) * scale


@fake_quantize.register_fake
def _(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    return torch.empty_like(x)


LAYER_KEY = "diffopt_quantized_layer"  # node meta: the layer a quantize / weight node belongs to


def insert_fake_quantize(graph: fx.Graph, value: fx.Node, scale: float | None, bits: int, layer: str) -> fx.Node:
    """A ``fake_quantize`` node (``scale=None``: ``dynamic_fake_quantize``, 8 bits) for
    ``layer``'s input at the graph's insertion point."""
    if scale is None:
        if bits != 8:
            raise ValueError("dynamic quantization is uint8: bits must be 8")
        node = graph.call_function(torch.ops.diffopt.dynamic_fake_quantize.default, (value,))
    else:
        node = graph.call_function(torch.ops.diffopt.fake_quantize.default, (value, float(scale), int(bits)))
    node.meta[LAYER_KEY] = layer
    return node


def insert_dequantize_weight(graph: fx.Graph, codes: fx.Node, scale: fx.Node, layer: str) -> fx.Node:
    node = graph.call_function(torch.ops.diffopt.dequantize_weight.default, (codes, scale))
    node.meta[LAYER_KEY] = layer
    return node


def quantization_summary(graphs: dict[str, fx.Graph]) -> dict[str, list[dict]]:
    """Per variant, every quantization step its graph performs, as the bundle manifest
    records it: layer, operand (activation / weight), scheme, bits, and for static
    activations the scale (zero point 0)."""
    summary = {}
    for variant, graph in graphs.items():
        steps = []
        for node in graph.nodes:
            layer = node.meta.get(LAYER_KEY)
            if node.target == torch.ops.diffopt.fake_quantize.default:
                steps.append(
                    {
                        "layer": layer,
                        "operand": "activation",
                        "scheme": "static symmetric",
                        "bits": node.args[2],
                        "scale": node.args[1],
                        "zero_point": 0,
                    }
                )
            elif node.target == torch.ops.diffopt.dynamic_fake_quantize.default:
                steps.append({"layer": layer, "operand": "activation", "scheme": "dynamic uint8 per tensor", "bits": 8})
            elif node.target == torch.ops.diffopt.dequantize_weight.default:
                steps.append({"layer": layer, "operand": "weight", "scheme": "int8 per output channel", "bits": 8})
        if steps:
            summary[variant] = steps
    return summary


def _onnx_dynamic_fake_quantize(x):
    from onnxscript import opset20 as op

    codes, scale, zero_point = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(codes, scale, zero_point)


def _onnx_dequantize_weight(codes, scale):
    from onnxscript import opset20 as op

    return op.DequantizeLinear(codes, scale, axis=1)


def _onnx_fake_quantize(x, scale: float, bits: int):
    from onnxscript import opset20 as op

    def like_x(value: float):
        return op.CastLike(op.Constant(value_float=value), x)

    qmax = largest_code(bits)
    step = like_x(scale)
    if bits != 8:
        return op.Mul(op.Clip(op.Round(op.Div(x, step)), like_x(-qmax), like_x(qmax)), step)
    limit = float(np.float32(qmax) * np.float32(scale))  # +-127 codes in float32, as DequantizeLinear computes it
    clipped = op.Clip(x, like_x(-limit), like_x(limit))  # QuantizeLinear alone would also give -128
    zero_point = op.Cast(op.Constant(value_int=0), to=INT8)
    return op.DequantizeLinear(op.QuantizeLinear(clipped, step, zero_point), step, zero_point)


ONNX_TRANSLATIONS = {
    torch.ops.diffopt.dynamic_fake_quantize.default: _onnx_dynamic_fake_quantize,
    torch.ops.diffopt.dequantize_weight.default: _onnx_dequantize_weight,
    torch.ops.diffopt.fake_quantize.default: _onnx_fake_quantize,
}
