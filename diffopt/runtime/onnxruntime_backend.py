"""The onnxruntime backend: runs an exported bundle's variants, from its manifest alone.

``load_bundle(directory)`` returns an ``OptimizedDenoiser`` over it, so every sampler
drives an exported bundle exactly like the torch program; no model code is imported.

Each variant is one ``InferenceSession``. Inputs are bound in place (IOBinding on the
torch tensors' memory) and outputs written straight into torch tensors. The state lives
in two pre-allocated buffer sets per batch size (ping-pong): a call reads one set and
writes the next state into the other, so the sampling loop allocates and copies no state.
The state tensors a call returns are therefore the backend's buffers: they stay valid
until the call after next overwrites them (samplers pass them straight back, which is
what they are for).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffopt.ir.program import concrete_shape
from diffopt.runtime.bundle import Manifest
from diffopt.runtime.denoiser import OptimizedDenoiser


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, bundle: str | Path, *, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
    ):
        import onnxruntime

        self.directory = Path(bundle)
        self.manifest = Manifest.load(self.directory)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # spinning worker threads keep burning the CPU after a call and slow down whatever runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.sessions = {
            name: onnxruntime.InferenceSession(str(self.directory / variant.file), options, providers=list(providers))
            for name, variant in self.manifest.variants.items()
        }
        self._state_buffers: dict[int, list[tuple[torch.Tensor, ...]]] = {}

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        spec = self.manifest.variants[variant]
        session = self.sessions[variant]
        binding = session.io_binding()
        batch_size = inputs[0].shape[0]
        bound = []  # keeps converted inputs alive until the run has finished
        for tensor_spec, tensor in zip(spec.inputs, inputs, strict=True):
            tensor = tensor.to("cpu", getattr(torch, tensor_spec.dtype)).contiguous()
            bound.append(tensor)
            binding.bind_input(
                tensor_spec.name, "cpu", 0, np.dtype(tensor_spec.dtype), list(tensor.shape), tensor.data_ptr()
            )
        state_in = bound[len(self.manifest.signature.input_names) :]
        first = torch.empty(
            concrete_shape(spec.outputs[0].shape, batch_size), dtype=getattr(torch, spec.outputs[0].dtype)
        )
        outputs = (first, *self._next_state_buffers(batch_size, state_in))
        for tensor_spec, tensor in zip(spec.outputs, outputs, strict=True):
            binding.bind_output(
                tensor_spec.name, "cpu", 0, np.dtype(tensor_spec.dtype), list(tensor.shape), tensor.data_ptr()
            )
        session.run_with_iobinding(binding)
        return outputs

    def _next_state_buffers(self, batch_size: int, state_in: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The buffer set the inputs are not read from."""
        if not self.manifest.state.entries:
            return ()
        sets = self._state_buffers.get(batch_size)
        if sets is None:
            sets = [self.manifest.state.allocate(batch_size) for _ in range(2)]
            self._state_buffers[batch_size] = sets
        reading = {t.data_ptr() for t in state_in}
        return next(s for s in sets if not reading & {t.data_ptr() for t in s})


def load_bundle(
    bundle: str | Path, *, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> OptimizedDenoiser:
    """An ``OptimizedDenoiser`` that runs the exported bundle in ``bundle`` on onnxruntime."""
    backend = OnnxRuntimeBackend(bundle, threads=threads, providers=providers)
    return OptimizedDenoiser(backend.manifest.interface(), backend=backend)
