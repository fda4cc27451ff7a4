"""Observer nodes: mark the activations calibration measures, as nodes of the graph.

Before: ``y = op(x, ...)`` for every linear op and attention product.
After: ``y = observe(op(observe(x, layer, "input", op), ...), layer, "output", op)`` for
linear ops, and ``observe(q|k|v, "<layer>.query|key|value", "input", "attention")`` on
the operands of attention. ``observe`` returns its value unchanged, so the observed program computes
exactly what the program did; ``measure.calibration`` runs it with the instrumented
interpreter, whose hook hands every observer's value to the statistics (pt2e's flow:
observers are graph nodes, and calibration is just running the model). Layer names come
from ``ir.layers.layer_names``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from diffopt.ir.layers import ATTENTION, ATTENTION_OPERANDS, LINEAR_OPS, layer_names, op_name
from diffopt.ir.program import StepProgram
from diffopt.passes.base import GraphPass, PassContext, PassResult

ROLES = ("input", "output")


def observe(value: torch.Tensor, layer: str, role: str, op: str) -> torch.Tensor:
    """The observer node's function: the identity (the instrumented interpreter reads the value)."""
    return value


def is_observer(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is observe


@dataclass(frozen=True)
class ObservedValue:
    """What one observer watches: a layer's input or output, and the op type it belongs to."""

    layer: str
    role: str
    op: str


def observed_values(graph: fx.Graph) -> dict[fx.Node, ObservedValue]:
    """Every observer node of ``graph`` with what it watches."""
    found = {}
    for node in graph.nodes:
        if is_observer(node):
            found[node] = ObservedValue(*node.args[1:])
    return found


def _insert(graph: fx.Graph, value: fx.Node, layer: str, role: str, op: str, where) -> fx.Node:
    with where:
        observer = graph.call_function(observe, (value, layer, role, op))
    observer.meta["val"] = value.meta.get("val")
    return observer


@dataclass(frozen=True)
class InsertObserversPass(GraphPass):
    """Insert observer nodes (module docstring) into every variant."""

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        modified = False
        for module in program.variants.values():
            graph = module.graph
            if any(is_observer(node) for node in graph.nodes):
                continue  # observed already: a second run changes nothing
            for node, layer in layer_names(graph).items():
                modified = True
                if node.target == ATTENTION:
                    for index, operand in enumerate(ATTENTION_OPERANDS):
                        value = node.args[index]
                        node.update_arg(
                            index,
                            _insert(
                                graph, value, f"{layer}.{operand}", "input", "attention", graph.inserting_before(node)
                            ),
                        )
                    continue
                if node.target not in LINEAR_OPS:
                    continue
                value = node.args[0]
                node.update_arg(0, _insert(graph, value, layer, "input", op_name(node), graph.inserting_before(node)))
                observer = _insert(graph, node, layer, "output", op_name(node), graph.inserting_after(node))
                node.replace_all_uses_with(
                    observer, delete_user_cb=lambda user, observer=observer: user is not observer
                )
        return PassResult(program, modified)
