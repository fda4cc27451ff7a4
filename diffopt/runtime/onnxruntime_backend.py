"""The onnxruntime bundle runtime: runs an exported bundle's variants, from its manifest alone.

``runtime.runtimes.load_bundle(directory)`` (``runtime="onnxruntime"``, the default) returns
an ``OptimizedDenoiser`` over it, so every sampler drives an exported bundle exactly like the
torch program; no model code is imported.

Each variant is one ``InferenceSession``. The bundle was checked when it was opened
(``Manifest.load``: checksums, schema); loading checks that every graph's inputs and
outputs are the ones the manifest declares (names, dtypes, static dimensions), so a
manifest that disagrees with its graphs is refused instead of binding buffers of the
wrong size. Inputs are bound in place (IOBinding on the torch tensors' memory) and
outputs are written straight into torch tensors allocated for that call from the same
declared specs: no copies, and no buffer is shared between calls, so any number of runs
(threads, interleaved functional runs) can use one loaded bundle at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from diffopt.ir.specs import BATCH, TensorSpec, concrete_shape
from diffopt.runtime.bundle import BundleError
from diffopt.runtime.runtimes import Bundle, register_runtime

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
ONNX_TYPES = {  # onnxruntime's type strings -> torch dtype names
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@register_runtime
class OnnxRuntimeBackend:
    """Runs a bundle's variants on onnxruntime; inputs, outputs and state live on the device its
    providers run on (``device``): the GPU for CUDA / TensorRT providers, else the CPU."""

    name: ClassVar[str] = "onnxruntime"

    def __init__(self, bundle: Bundle, *, threads: int | None = None, providers: Sequence[str] | None = None):
        import onnxruntime

        available = onnxruntime.get_available_providers()
        providers = list(providers) if providers is not None else default_providers(available)
        missing = [provider for provider in providers if provider not in available]
        if missing:
            raise ValueError(
                f"onnxruntime providers {missing} are not available in this onnxruntime (available: "
                f"{available}); install onnxruntime-gpu for CUDA / TensorRT"
            )
        self.providers = providers
        # where inputs, outputs and state live: the GPU when a GPU provider runs the graphs
        self.device = torch.device("cuda" if set(providers) & set(GPU_PROVIDERS) else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"onnxruntime providers {providers} run on the GPU, but this torch has no CUDA to hold the inputs "
                f"and outputs bound to them: install a CUDA torch, or pass providers=['CPUExecutionProvider']"
            )
        self.directory, self.manifest = bundle.directory, bundle.manifest
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # spinning worker threads keep burning the CPU after a call and slow down whatever runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.sessions = {}
        for name, variant in self.manifest.variants.items():
            path = self.directory / variant.file
            try:
                session = onnxruntime.InferenceSession(str(path), options, providers=providers)
            except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
                raise BundleError(
                    f"bundle {self.directory}: {variant.file} cannot be loaded by onnxruntime: "
                    f"{str(error).strip()[:300]}"
                ) from error
            _check_graph_io(self.directory, variant.file, "input", session.get_inputs(), variant.inputs)
            _check_graph_io(self.directory, variant.file, "output", session.get_outputs(), variant.outputs)
            self.sessions[name] = session

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.manifest.variants)

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        spec = self.manifest.variants[variant]
        session = self.sessions[variant]
        binding = session.io_binding()
        batch_size = inputs[0].shape[0]
        bound = []  # keeps converted inputs alive until the run has finished
        for tensor_spec, tensor in zip(spec.inputs, inputs, strict=True):
            tensor = tensor.to(self.device, tensor_spec.torch_dtype).contiguous()
            bound.append(tensor)
            _bind(binding.bind_input, tensor_spec, tensor)
        outputs = tuple(
            torch.empty(concrete_shape(s.shape, batch_size), dtype=s.torch_dtype, device=self.device)
            for s in spec.outputs
        )
        for tensor_spec, tensor in zip(spec.outputs, outputs, strict=True):
            _bind(binding.bind_output, tensor_spec, tensor)
        session.run_with_iobinding(binding)
        return outputs


def default_providers(available: Sequence[str]) -> list[str]:
    """CUDA when this onnxruntime has it (TensorRT's provider only when asked for: it builds
    engines on first use), else the CPU."""
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available
        else ["CPUExecutionProvider"]
    )


def _bind(bind, spec: TensorSpec, tensor: torch.Tensor) -> None:
    """Bind ``tensor``'s memory in place, on its device (the backend's: a CUDA binding is not
    exercised on this project's CPU-only CI, and the lent GPU machine has the CPU build of
    onnxruntime, so the CUDA path is untested)."""
    device = tensor.device
    bind(spec.name, device.type, device.index or 0, np.dtype(spec.dtype), list(tensor.shape), tensor.data_ptr())


def _check_graph_io(directory: Path, file: str, kind: str, found, declared: Sequence[TensorSpec]) -> None:
    """The graph's inputs / outputs are the manifest's: names, dtypes, static dimensions."""
    where = f"bundle {directory}: {file}"
    names = [value.name for value in found]
    if names != [spec.name for spec in declared]:
        raise BundleError(
            f"{where}: the graph's {kind}s {names} are not the manifest's {[spec.name for spec in declared]}"
        )
    for value, spec in zip(found, declared):
        dtype = ONNX_TYPES.get(value.type, value.type)
        dims = [d if isinstance(d, int) else BATCH for d in value.shape]
        if dtype != spec.dtype or dims != list(spec.shape):
            raise BundleError(
                f"{where}: {kind} {spec.name!r} is {dtype} {dims} in the graph but {spec.dtype} "
                f"{list(spec.shape)} in the manifest"
            )
