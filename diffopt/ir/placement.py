"""Placement: a step program on another device and in another float dtype, as a new program.

Before: variants whose weights, tensor constants and creation ops live where capture put
them (``aten.arange(..., device=cpu)``, ``dtype=float32`` baked in by torch.export).
After: new graphs in which every tensor the graphs read (parameters, buffers and plain
tensor constants, which ``GraphModule.to()`` would leave behind) is moved to ``device``
and, when ``dtype`` is given, every float32 / float16 / bfloat16 tensor is cast to it
once; every ``torch.device`` and every such float dtype among the ops' arguments (creation
ops, casts) is rewritten the same way, and so are the float inputs and state. float64
values (exact integer emulation) and integer tensors keep their dtype. Weights shared
between variants stay shared; the program (and the user's model) it came from is not
touched.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx

from diffopt.ir.graph_tools import attribute
from diffopt.ir.program import StepProgram
from diffopt.ir.specs import StateEntry, StateSpec, TensorSpec

CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def place(
    program: StepProgram, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> StepProgram:
    """``program`` with its weights, constants, creation ops, inputs and state on
    ``device`` and in ``dtype`` (module docstring); None keeps that property."""
    if dtype is not None and dtype not in CASTABLE:
        raise ValueError(f"dtype must be one of {[str(d) for d in CASTABLE]} or None, found {dtype!r}")
    target = torch.device(device) if device is not None else program.device
    converted: dict[int, torch.Tensor] = {}

    def tensor(value: torch.Tensor) -> torch.Tensor:
        if id(value) not in converted:  # shared weights are converted once and stay shared
            new = value.detach()
            if dtype is not None and new.dtype in CASTABLE:
                new = new.to(dtype)
            converted[id(value)] = new.to(target)
        return converted[id(value)]

    def constant(value):
        if isinstance(value, torch.device):
            return target
        if isinstance(value, torch.dtype) and dtype is not None and value in CASTABLE:
            return dtype
        return value

    variants = {}
    for name, module in program.variants.items():
        graph = copy.deepcopy(module.graph)
        attributes = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                value = attribute(module, node.target)
                attributes[node.target] = tensor(value) if isinstance(value, torch.Tensor) else value
            elif node.op == "call_function":
                node.args = fx.node.map_aggregate(node.args, constant)
                node.kwargs = fx.node.map_aggregate(node.kwargs, constant)
        variants[name] = fx.GraphModule(attributes, graph)
    return dataclasses.replace(
        program,
        variants=variants,
        state=StateSpec(tuple(_cast_entry(entry, dtype) for entry in program.state.entries)),
        input_specs=tuple(_cast_spec(spec, dtype) for spec in program.inputs),
        device=target,
    )


def _cast_spec(spec: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    if dtype is None or spec.torch_dtype not in CASTABLE:
        return spec
    return dataclasses.replace(spec, dtype=str(dtype).removeprefix("torch."))


def _cast_entry(entry: StateEntry, dtype: torch.dtype | None) -> StateEntry:
    if dtype is None or entry.dtype not in CASTABLE:
        return entry
    return dataclasses.replace(entry, dtype=dtype)
