"""``optimize``: model or captured graph -> passes -> ``OptimizedDenoiser``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffopt.capture import capture
from diffopt.ir.placement import place
from diffopt.ir.policy import LayerPolicy
from diffopt.ir.program import StepProgram
from diffopt.ir.signature import CapturedGraph
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.passes.base import GraphPass, PassContext, Pipeline, pass_list
from diffopt.runtime.backends import program_backend
from diffopt.runtime.denoiser import OptimizedDenoiser


def optimize(
    model_or_graph: torch.nn.Module | CapturedGraph | StepProgram,
    passes: Sequence[GraphPass] = (),
    *,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    calibration: CalibrationStatistics | None = None,
    policy: LayerPolicy | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "torch",
) -> OptimizedDenoiser:
    """Capture (if given a module), run ``passes`` in a verifying ``Pipeline``, place the
    result on ``device`` / in ``dtype`` (``ir.placement``), and run it on ``backend``, a
    registered backend that runs programs (``runtime.backends``): ``"torch"`` (eager fx
    graphs) or ``"compiled"`` (``torch.compile`` per variant; CUDA graphs on CUDA).

    The input is never modified: passes work on a copy of the graphs (weights are shared
    until placement copies them). ``optimized.pass_records`` lists each pass and whether it
    changed the program.
    """
    backend_class = program_backend(backend, "optimize()")
    passes = pass_list(passes)  # a single pass or a wrong type is refused before any capture
    if isinstance(model_or_graph, StepProgram):
        program = model_or_graph.copy()
    elif isinstance(model_or_graph, CapturedGraph):
        program = StepProgram.from_captured(model_or_graph)
    elif isinstance(model_or_graph, torch.nn.Module):
        if example_inputs is None:
            raise ValueError(
                f"optimize() needs example_inputs to capture {type(model_or_graph).__name__}; or pass "
                f"diffopt.capture(model, example_inputs) instead of the model"
            )
        program = StepProgram.from_captured(capture(model_or_graph, example_inputs))
    else:
        raise TypeError(
            f"optimize() expects an nn.Module, a CapturedGraph or a StepProgram, found {type(model_or_graph).__name__}"
        )
    context = PassContext(
        statistics=calibration,
        policy=policy or LayerPolicy(),
        example_inputs=tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else None,
    )
    program, records = Pipeline(passes).run(program, context)
    if device is not None or dtype is not None:
        program = place(program, device, dtype)
    denoiser = OptimizedDenoiser(program, backend=backend_class(program))
    denoiser.pass_records = records
    return denoiser
