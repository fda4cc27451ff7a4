"""Symmetric integer quantization shared by calibration, the quantization passes and cost
accounting: ``codes = clamp(round(x / scale), -qmax, qmax)`` with ``qmax = 2**(bits-1) - 1``
and zero point 0 (the form TensorRT's Quantize layer accepts). Codes are kept in float
tensors: integer-valued floats are exact up to 2**24 (float32) / 2**53 (float64).

Code widths (``code_width_fractions``): a code "fits in 4 bits" if ``|c| <= 7``; codes of a
difference of two int8 codes can need 9 bits (``|c| > 127``).
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
WIDTH_CLASSES = ("zero", "4bit", "8bit", "wider")  # |c| == 0, <= 7, <= 127, > 127
WIDTH_BITS = {"zero": 0, "4bit": 4, "8bit": 8, "wider": 16}  # operand bits charged per class in bit-operations


def largest_code(bits: int) -> int:
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, found {bits}")
    return 2 ** (bits - 1) - 1


def symmetric_scale(absmax: float, bits: int) -> float:
    """The scale that maps ``[-absmax, absmax]`` onto ``[-qmax, qmax]``."""
    return max(float(absmax), 1e-12) / largest_code(bits)


def quantize(x: torch.Tensor, scale: float | torch.Tensor, bits: int) -> torch.Tensor:
    """Integer-valued codes of ``x`` (same dtype as ``x``)."""
    qmax = largest_code(bits)
    return torch.clamp(torch.round(x / scale), -qmax, qmax)


def quantize_weight_per_channel(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale per output channel) of a Linear/Conv weight, output channels on axis 0."""
    absmax = weight.detach().abs().reshape(weight.shape[0], -1).amax(1).clamp_min(1e-12)
    scale = absmax / largest_code(bits)
    return quantize(weight.detach(), scale.reshape(-1, *[1] * (weight.dim() - 1)), bits), scale


def code_width_fractions(codes: torch.Tensor) -> dict[str, float]:
    """Fraction of codes in each width class of ``WIDTH_CLASSES``."""
    magnitude = codes.abs()
    total = max(codes.numel(), 1)
    zero = int((magnitude == 0).sum())
    within4 = int((magnitude <= 7).sum())
    within8 = int((magnitude <= 127).sum())
    return {
        "zero": zero / total,
        "4bit": (within4 - zero) / total,
        "8bit": (within8 - within4) / total,
        "wider": (codes.numel() - within8) / total,
    }


def mean_operand_bits(fractions: dict[str, float]) -> float:
    """Average activation-operand bits per code, zero codes skipped (charged 0 bits)."""
    return sum(fractions[name] * WIDTH_BITS[name] for name in WIDTH_CLASSES)


def insert_quantize(graph: fx.Graph, value: fx.Node, scale: float, bits: int) -> fx.Node:
    """Insert the nodes of ``quantize(value, scale, bits)`` (at the graph's insertion point)."""
    qmax = largest_code(bits)
    scaled = graph.call_function(aten.div.Tensor, (value, scale))
    return graph.call_function(aten.clamp.default, (graph.call_function(aten.round.default, (scaled,)), -qmax, qmax))
