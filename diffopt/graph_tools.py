"""Small helpers passes share to read and edit variant graphs.

Reading: the user-facing module name and op type of an aten node. Editing:
``thread_state`` adds one state tensor to every variant of a program
(``(..., *state) -> (out, *new_state)`` grows by one input and one output).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from typing import Callable

import torch
from torch import fx

from diffopt.capture import WRAPPED_MODEL_ATTRIBUTE
from diffopt.program import BATCH, StateEntry, StepProgram

aten = torch.ops.aten


def module_path(node: fx.Node) -> str:
    """Name of the innermost module that produced ``node``, as in ``model.named_modules()``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    prefix = WRAPPED_MODEL_ATTRIBUTE + "."
    if path == WRAPPED_MODEL_ATTRIBUTE:
        return ""
    return path.removeprefix(prefix)


def module_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][1].rsplit(".", 1)[-1] if stack else ""


def op_type(node: fx.Node) -> str:
    """``aten.linear.default`` -> ``"linear"``; non-aten nodes -> their op kind."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def state_shape(node: fx.Node) -> tuple[int | str, ...]:
    """The shape of ``node``'s value with its symbolic (batch) dimension marked ``BATCH``."""
    shape = node.meta["val"].shape
    dims = tuple(BATCH if isinstance(d, torch.SymInt) else int(d) for d in shape)
    if dims.count(BATCH) > 1 or (BATCH in dims and dims[0] != BATCH):
        raise ValueError(f"node {node.name} has shape {tuple(shape)}: only a leading batch dimension may be "
                         f"dynamic in a state tensor")
    return dims


def placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def output_values(graph: fx.Graph) -> tuple:
    return tuple(graph.output_node().args[0])


def thread_state(program: StepProgram, entry: StateEntry,
                 update: Callable[[str, fx.Graph, fx.Node], fx.Node]) -> StepProgram:
    """Add ``entry`` as the last state input and output of every variant.

    ``update(variant_name, graph, state_input)`` inserts whatever the variant computes
    and returns the node holding the new state value. A variant that leaves the state
    unchanged may return ``state_input`` (or any other input): it is copied
    (``aten.clone``), because a graph output that is an input aliases buffers in runtimes.
    """
    for name, module in program.variants.items():
        graph = module.graph
        last_input = placeholders(graph)[-1]
        with graph.inserting_after(last_input):
            state_input = graph.placeholder(re.sub(r"\W", "_", entry.name))  # argument names are identifiers
        new_value = update(name, graph, state_input)
        output = graph.output_node()
        if new_value.op == "placeholder":
            with graph.inserting_before(output):
                new_value = graph.call_function(aten.clone.default, (state_input,))
        output.args = ((*output.args[0], new_value),)
        module.recompile()
    return dataclasses.replace(program, state=program.state.with_entry(entry))


def add_variant(program: StepProgram, name: str, copy_of: str) -> fx.GraphModule:
    """Add variant ``name`` as a copy of variant ``copy_of`` (new graph, shared weights)."""
    if name in program.variants:
        raise ValueError(f"variant {name!r} already exists")
    source = program.variants[copy_of]
    program.variants[name] = fx.GraphModule(source, copy.deepcopy(source.graph))
    return program.variants[name]
