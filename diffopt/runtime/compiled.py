"""The compiled backend: every variant compiled whole with ``torch.compile``.

Every variant is a branch-free graph, so each compiles as one graph with no breaks
(``fullgraph=True`` makes a break an error): caching decisions live in the schedule, not
in the graph, which is what lets caching compose with compilation. On CPU the graphs go
through inductor's C++ code generation; on CUDA the default mode is
``"reduce-overhead"`` (CUDA graphs), whose outputs live in a memory pool the next replay
overwrites, so the outputs (the step's result and its new state) are copied out of the
pool before they are returned and ``cudagraph_mark_step_begin`` marks each call.

Outputs are returned contiguous, so state fed back keeps the strides ``init_state`` gives
it and no variant compiles twice for a stride.

Shapes: the first call compiles for its shapes; a new batch size recompiles once with a
dynamic batch (torch's automatic dynamic shapes), after which batch sizes do not
recompile. Each recompile is counted in ``recompiles`` and reported with a warning.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch

from diffopt.ir.program import StepProgram
from diffopt.runtime.backends import TorchBackend, register_backend

logger = logging.getLogger("diffopt")


@register_backend
class CompiledBackend(TorchBackend):
    name: ClassVar[str] = "compiled"

    def __init__(self, program: StepProgram, *, mode: str | None = None, dynamic: bool | None = None):
        super().__init__(program)
        self.mode = mode or ("reduce-overhead" if program.device.type == "cuda" else "default")
        self.dynamic = dynamic
        self.compiled: dict[str, torch.nn.Module] = {}
        self.batch_sizes: dict[str, set[int]] = {}
        self.recompiles = 0

    @classmethod
    def for_program(cls, program: StepProgram, like: CompiledBackend) -> CompiledBackend:
        return cls(program, mode=like.mode, dynamic=like.dynamic)

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.mode in ("reduce-overhead", "max-autotune")

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        first_call = variant not in self.compiled
        if first_call:
            self.compiled[variant] = torch.compile(
                self.modules[variant], mode=self.mode, dynamic=self.dynamic, fullgraph=True
            )
            logger.info("diffopt: compiling variant %r (torch.compile, mode %s)", str(variant), self.mode)
            start = time.perf_counter()
        self._note_batch(variant, inputs[0].shape[0])
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            outputs = tuple(self.compiled[variant](*inputs))
        if first_call:
            logger.info("diffopt: compiled variant %r in %.1f s", str(variant), time.perf_counter() - start)
        if self.uses_cuda_graphs:  # the pool is overwritten by the next replay
            return tuple(output.clone(memory_format=torch.contiguous_format) for output in outputs)
        # state comes back as the next step's input: contiguous, as init_state allocates it, or the
        # graph is guarded on the first stride it saw and compiled again for the other
        return tuple(output.contiguous() for output in outputs)

    def _note_batch(self, variant: str, batch_size: int) -> None:
        seen = self.batch_sizes.setdefault(variant, set())
        if batch_size in seen:
            return
        if len(seen) == 1 and self.dynamic is not True:  # torch recompiles once, with a dynamic batch
            self.recompiles += 1
            warnings.warn(
                f"CompiledBackend: variant {str(variant)!r} recompiles for batch {batch_size} (compiled for "
                f"{sorted(seen)}); later batch sizes reuse the dynamic-batch graph",
                stacklevel=3,
            )
        seen.add(batch_size)
