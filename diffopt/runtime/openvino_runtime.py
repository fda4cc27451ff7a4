"""The OpenVINO bundle runtime: runs an exported bundle's ONNX variants on OpenVINO (CPU).

``load_bundle(directory, runtime="openvino", precision="f32" | "bf16", threads=N)``. OpenVINO
reads the bundle's ONNX files directly (the shared weights file included); each variant is
compiled once for the CPU, with ``precision`` as its inference precision hint: ``"bf16"``
runs the matrix products in bfloat16 on CPUs that have it (AVX-512 BF16, AMX), ``"f32"``
keeps float32. By default it is the bundle's: ``"bf16"`` for a bundle exported with
``precision="bf16"``, else ``"f32"`` (an int8 bundle's integer products stay integer).
State is threaded exactly as on onnxruntime: inputs ``(latent, timestep,
*conditions, *state)`` by the manifest's names, outputs ``(out, *new_state)`` in its order.
The outputs are copied out of OpenVINO's buffers (the next inference reuses them), so any
number of runs can interleave on one loaded bundle; each call makes its own infer request,
so threads can share it too. Install with ``pip install diffopt[openvino]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from diffopt.runtime.bundle import BundleError
from diffopt.runtime.runtimes import Bundle, register_runtime

PRECISIONS = {"f32": "f32", "bf16": "bf16"}  # diffopt's name -> OpenVINO's INFERENCE_PRECISION_HINT


@register_runtime
class OpenVinoRuntime:
    """Runs a bundle's variants on OpenVINO's CPU plugin; inputs, outputs and state live on the CPU."""

    name: ClassVar[str] = "openvino"
    device = torch.device("cpu")

    def __init__(self, bundle: Bundle, *, threads: int | None = None, precision: str | None = None):
        try:
            import openvino
        except ImportError as error:
            raise ImportError(f"the openvino runtime needs OpenVINO: pip install diffopt[openvino] ({error})") from None
        precision = precision or ("bf16" if bundle.manifest.precision == "bf16" else "f32")
        if precision not in PRECISIONS:
            raise ValueError(f"openvino runtime: precision must be one of {sorted(PRECISIONS)}, found {precision!r}")
        self.manifest, self.precision = bundle.manifest, precision
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        config["INFERENCE_NUM_THREADS"] = threads or torch.get_num_threads()
        core = openvino.Core()
        self.compiled = {}
        for name, variant in self.manifest.variants.items():
            try:
                self.compiled[name] = core.compile_model(str(bundle.directory / variant.file), "CPU", config)
            except RuntimeError as error:
                raise BundleError(
                    f"bundle {bundle.directory}: {variant.file} cannot be compiled by OpenVINO: {str(error)[:300]}"
                ) from error

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.manifest.variants)

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        spec = self.manifest.variants[variant]
        feeds = {
            tensor_spec.name: np.ascontiguousarray(tensor.detach().to("cpu", tensor_spec.torch_dtype).numpy())
            for tensor_spec, tensor in zip(spec.inputs, inputs, strict=True)
        }
        request = self.compiled[variant].create_infer_request()
        request.infer(feeds)
        outputs = [request.get_output_tensor(index).data for index in range(len(spec.outputs))]
        return tuple(
            torch.from_numpy(np.array(value, copy=True)).to(tensor_spec.torch_dtype)
            for value, tensor_spec in zip(outputs, spec.outputs, strict=True)
        )
