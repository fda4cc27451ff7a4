"""Toy passes that exercise the pass contract and the state mechanism (tests only).

``CarryActivationPass``: step 0 runs variant ``first`` (the plain model) and stores the
output of the graph's first linear layer in state; every later step runs ``carry``,
which adds the per-sample mean of the PREVIOUS step's stored activation to the output,
and stores the current one. ``StepCounterPass`` threads a per-sample step counter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from diffopt.ir.graph_tools import add_variant, output_values, thread_state
from diffopt.ir.schedules import Schedule
from diffopt.ir.specs import BATCH, FULL, StateEntry
from diffopt.passes.base import GraphPass, PassResult

aten = torch.ops.aten


def first_linear(graph):
    return next(n for n in graph.nodes if n.target == aten.linear.default)


@dataclass(frozen=True)
class CarryActivationPass(GraphPass):
    def call(self, program, context):
        if "carry" in program.variants:
            return PassResult(program, False)
        linear = first_linear(program.variants[FULL].graph)
        feature_shape = tuple(int(d) for d in linear.meta["val"].shape[1:])
        program.variants["first"] = program.variants.pop(FULL)
        add_variant(program, "carry", copy_of="first")

        def update(variant, graph, state_input):
            activation = first_linear(graph)
            if variant == "carry":
                out = output_values(graph)[0]
                with graph.inserting_before(graph.output_node()):
                    dims = list(range(1, len(feature_shape) + 1))
                    mean = graph.call_function(aten.mean.dim, (state_input, dims, False))
                    shaped = graph.call_function(aten.view.default, (mean, [-1, 1, 1, 1]))
                    new_out = graph.call_function(aten.add.Tensor, (out, shaped))
                graph.output_node().args = ((new_out, *output_values(graph)[1:]),)
            return activation

        entry = StateEntry("carried_activation", (BATCH, *feature_shape), torch.float32, self.name)
        program = thread_state(program, entry, update)
        return PassResult(dataclasses.replace(program, schedule=Schedule("first", "carry")), True)


@dataclass(frozen=True)
class StepCounterPass(GraphPass):
    def call(self, program, context):
        if "step_counter" in program.state.names:
            return PassResult(program, False)

        def update(variant, graph, state_input):
            with graph.inserting_before(graph.output_node()):
                return graph.call_function(aten.add.Tensor, (state_input, 1.0))

        entry = StateEntry("step_counter", (BATCH,), torch.float32, self.name)
        return PassResult(thread_state(program, entry, update), True)
