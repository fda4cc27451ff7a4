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
