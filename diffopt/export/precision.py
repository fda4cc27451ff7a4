"""Bundle precisions: what ``to_onnx(precision=...)`` does to the exported float32 variants.

- ``fp32``: nothing.
- ``bf16``: nothing in the files; the manifest says ``bf16``, and the OpenVINO runtime then
  compiles every variant at bfloat16 inference precision (measured faster on this CPU than
  bf16 graphs; onnxruntime runs the same files in float32).
- ``int8-dynamic``: onnxruntime's dynamic quantization of every variant (``full``, cached,
  forecast, probe): the weights of its matrix products (MatMul, Gemm with a constant
  weight) become int8 per output channel, their activations are quantized at run time
  (``DynamicQuantizeLinear``, one scale per tensor) for onnxruntime's fused integer kernels.
  The first and the last of them stay float32 (the patch or input projection and the output
  projection, where the error shows most). The activation scale spans the whole batch, so
  the manifest records these layers as dynamic: the serving engines run such a bundle's
  requests alone, never batched together.
- ``int8-static``: the graphs as the program holds them, which must already be Q/DQ: a program
  optimized with ``StaticQuantizationPass(weight_form="qdq")`` and calibration statistics
  (``diffopt export --precision int8-static --calibration FILE`` adds it). Activations are
  quantized with fixed calibrated scales (QuantizeLinear / DequantizeLinear, zero point 0),
  weights are int8 per output channel (DequantizeLinear): the explicit quantization TensorRT
  reads, which OpenVINO runs as integer kernels. Each sample is scaled alone, so requests batch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from diffopt.runtime.bundle import PRECISIONS

QUANTIZED_OPS = ("MatMul", "Gemm")
DYNAMIC_SCHEME = "dynamic int8 per tensor (onnxruntime)"


def check_precision(precision: Any, profile: str) -> str:
    """``precision`` if ``to_onnx`` can write it for ``profile``; else a ``ValueError`` naming it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, found {precision!r}")
    if precision == "int8-dynamic" and profile == "tensorrt":
        raise ValueError(
            "precision 'int8-dynamic' is onnxruntime's run-time quantization, which TensorRT does not read: "
            "export the tensorrt profile in fp32"
        )
    return precision


def require_static_quantization(precision: str, quantization: dict[str, list[dict[str, Any]]]) -> None:
    """For ``int8-static``: a ``ValueError`` unless some variant (``quant.ops.quantization_summary``)
    has int8 weights behind a static activation scale."""
    schemes = {step["scheme"] for steps in quantization.values() for step in steps}
    if precision == "int8-static" and not {"static symmetric", "int8 per output channel"} <= schemes:
        raise ValueError(
            "precision 'int8-static' exports Q/DQ graphs, and this program has none: optimize it with "
            "StaticQuantizationPass(weight_form='qdq') and calibration statistics (or run "
            "`diffopt export --precision int8-static --calibration FILE`)"
        )


def quantize_variant(path: Path) -> list[dict[str, Any]]:
    """Quantize the variant file at ``path`` in place (``int8-dynamic``); the quantization
    steps it now performs, as the manifest records them."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(path))  # with its external weights
    weights = {initializer.name for initializer in model.graph.initializer}
    linear = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.input[1] in weights and n.name]
    kept = {linear[0], linear[-1]} if len(linear) > 2 else set(linear)
    staged = path.with_name(path.name + ".int8")
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # it advises, per file, a pre-processing these graphs do not need
    try:
        quantize_dynamic(
            str(path),
            str(staged),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=sorted(kept),
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.level = level
    os.replace(staged, path)
    return [
        {"layer": name, "operand": "activation and weight", "scheme": DYNAMIC_SCHEME, "bits": 8}
        for name in linear
        if name not in kept
    ]
