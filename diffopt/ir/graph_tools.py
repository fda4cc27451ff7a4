"""Small helpers passes share to read and edit variant graphs.

Reading: the user-facing module name and op type of an aten node. Editing:
``thread_state`` adds one state tensor to every variant of a program
(``(..., *state) -> (out, *new_state)`` grows by one input and one output).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from collections.abc import Callable, Sequence

import torch
from torch import fx

from diffopt.ir.program import StepProgram
from diffopt.ir.signature import WRAPPED_MODEL_ATTRIBUTE
from diffopt.ir.specs import BATCH, StateEntry

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


def module_scopes(node: fx.Node) -> list[str]:
    """Names of every module ``node`` was produced inside, outermost first (``""`` for the model)."""
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    return [path.split(".", 1)[1] if "." in path else "" for path in paths]


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
        raise ValueError(
            f"node {node.name} has shape {tuple(shape)}: only a leading batch dimension may be "
            f"dynamic in a state tensor"
        )
    return dims


def node_named(graph: fx.Graph, name: str) -> fx.Node:
    """The node called ``name`` (variants copied with ``add_variant`` keep node names)."""
    for node in graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"no node named {name!r} in the graph")


def insert_relative_change(graph: fx.Graph, value: fx.Node, reference: fx.Node) -> fx.Node:
    """Insert ``mean|value - reference| / mean|reference|`` (a 0-d tensor over the whole
    batch) before the graph's output; infinite or NaN while ``reference`` is still zero."""
    with graph.inserting_before(graph.output_node()):
        change = graph.call_function(aten.sub.Tensor, (value, reference))
        numerator = graph.call_function(aten.mean.default, (graph.call_function(aten.abs.default, (change,)),))
        denominator = graph.call_function(aten.mean.default, (graph.call_function(aten.abs.default, (reference,)),))
        return graph.call_function(aten.div.Tensor, (numerator, denominator))


def finish_probe(module: fx.GraphModule, signal: fx.Node) -> None:
    """Make ``module`` a probe variant: its first output becomes ``signal``, and the work
    that only fed the old first output is removed."""
    output = module.graph.output_node()
    output.args = ((signal, *output.args[0][1:]),)
    remove_dead_code(module)


def remove_dead_code(module: fx.GraphModule) -> None:
    """Drop every node whose value is unused, then recompile. Unlike fx's default, ops
    tagged random (attention: its optional dropout) count as removable; only mutating
    ops are kept (export graphs are functional, so there are none in practice)."""
    module.graph.eliminate_dead_code(is_impure_node=_mutates)
    module.recompile()


def _mutates(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def attribute(module: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` node with ``target`` reads."""
    return functools.reduce(getattr, target.split("."), module)


def placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def output_values(graph: fx.Graph) -> tuple:
    return tuple(graph.output_node().args[0])


def thread_state(
    program: StepProgram, entry: StateEntry, update: Callable[[str, fx.Graph, fx.Node], fx.Node]
) -> StepProgram:
    """Add ``entry`` as the last state input and output of every variant.

    ``update(variant_name, graph, state_input)`` inserts whatever the variant computes
    and returns the node holding the new state value. A variant that leaves the state
    unchanged may return ``state_input`` (or any other input): it is copied
    (``aten.clone``), because a graph output that is an input aliases buffers in runtimes.
    The graphs are edited, not recompiled: the ``Pipeline`` recompiles every variant
    after each pass (recompiling per state entry made passes with 100 entries take 20 s).
    """
    return thread_states(program, (entry,), lambda name, graph, inputs: (update(name, graph, inputs[0]),))


def thread_states(
    program: StepProgram,
    entries: Sequence[StateEntry],
    update: Callable[[str, fx.Graph, tuple[fx.Node, ...]], Sequence[fx.Node]],
) -> StepProgram:
    """``thread_state`` for entries whose new values are computed together:
    ``update(variant_name, graph, state_inputs)`` returns one new value per entry."""
    for name, module in program.variants.items():
        graph = module.graph
        state_inputs = []
        for entry in entries:
            with graph.inserting_after(placeholders(graph)[-1]):
                state_inputs.append(graph.placeholder(re.sub(r"\W", "_", entry.name)))  # names are identifiers
        new_values = list(update(name, graph, tuple(state_inputs)))
        if len(new_values) != len(entries):
            raise ValueError(f"variant {name!r}: {len(entries)} state entries, {len(new_values)} new values")
        output = graph.output_node()
        for index, value in enumerate(new_values):
            if value.op == "placeholder":
                with graph.inserting_before(output):
                    new_values[index] = graph.call_function(aten.clone.default, (value,))
        output.args = ((*output.args[0], *new_values),)
    for entry in entries:
        program = dataclasses.replace(program, state=program.state.with_entry(entry))
    return program


def add_variant(program: StepProgram, name: str, copy_of: str) -> fx.GraphModule:
    """Add variant ``name`` as a copy of variant ``copy_of`` (new graph, shared weights)."""
    if name in program.variants:
        raise ValueError(f"variant {name!r} already exists")
    source = program.variants[copy_of]
    program.variants[name] = fx.GraphModule(source, copy.deepcopy(source.graph))
    return program.variants[name]


BATCH_COUPLED_OPS = ("diffopt::dynamic_fake_quantize",)  # one sample's result depends on the whole batch (one scale)


def batch_coupled_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The nodes whose result for one sample depends on the other samples of the batch
    (``quant.ops``' dynamic quantization computes one scale per batch)."""
    return [
        node
        for node in graph.nodes
        if node.op == "call_function" and getattr(node.target, "name", lambda: "")() in BATCH_COUPLED_OPS
    ]
