"""Block caching: reuse what whole blocks computed on an earlier step.

``BlockCachePass`` (FORA / DeepCache style, fixed period). Before: every step runs every
block. After: variant ``full`` runs them and stores, per selected block, its residual
``out - in`` (a block whose output has the shape of its hidden input, e.g. a transformer
block) or else its output (e.g. a UNet up block); variant ``cached`` rebuilds the
block's output from the cache (``in + residual``, or the stored output), so the block,
and everything that only fed it, is gone from that graph. Caching UNet ``up_blocks.1``
this way leaves only the outermost down/up blocks live: DeepCache.

``FirstBlockCachePass`` (adaptive; diffusers' FirstBlockCache). Variant ``probe`` runs
the model up to the first block of the chain and returns the change of the first
block's residual since the last full step, ``mean|r - r_ref| / mean|r_ref|``. At or below
``threshold`` the ``cached`` variant adds the stored residual of all later blocks to the
first block's output; above it ``full`` recomputes them and refreshes ``r_ref`` and the
stored residual. The first block's output reaches both variants through state, so the
first block runs once per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from diffopt.ir.annotations import NodeAnnotation, annotate
from diffopt.ir.graph_tools import (
    add_variant,
    finish_probe,
    insert_relative_change,
    module_scopes,
    remove_dead_code,
    state_shape,
    thread_state,
)
from diffopt.ir.layers import find_blocks
from diffopt.ir.program import CACHED, FULL, PROBE, AdaptiveSchedule, Schedule, StateEntry, StepProgram
from diffopt.ir.validation import block_names, require_int, require_number
from diffopt.passes.base import (
    GraphPass,
    PassContext,
    PassNotApplicable,
    PassResult,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class BlockBoundary:
    """Where a block meets the rest of the graph."""

    output: fx.Node  # the one value the block passes on
    hidden_input: fx.Node | None  # the input with the output's shape (None: the block changes shape)


def block_boundary(graph: fx.Graph, block: str) -> BlockBoundary:
    members = {node for node in graph.nodes if block in module_scopes(node)}
    if not members:
        raise ValueError(f"block {block!r} has no nodes in this graph; blocks: {_all_blocks(graph)}")
    outputs = [node for node in graph.nodes if node in members and any(u not in members for u in node.users)]
    if len(outputs) != 1:
        raise ValueError(
            f"block {block!r} passes {len(outputs)} values on ({[n.name for n in outputs]}); "
            f"block caching needs blocks with exactly one output: choose other blocks"
        )
    output = outputs[0]
    shape = _shape(output)
    inputs = {
        arg
        for node in members
        for arg in node.all_input_nodes
        if arg not in members and arg.op != "get_attr" and _shape(arg) == shape
    }
    return BlockBoundary(output, inputs.pop() if len(inputs) == 1 else None)


def _shape(node: fx.Node) -> tuple[str, ...] | None:
    value = node.meta.get("val")
    return tuple(str(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


def _all_blocks(graph: fx.Graph) -> list[str]:
    return [name for names in find_blocks(graph).values() for name in names]


@dataclass(frozen=True)
class BlockCachePass(GraphPass):
    kind: ClassVar[str] = "cache"
    after: ClassVar[tuple[str, ...]] = ("temporal-difference",)

    blocks: tuple[str, ...] | None = None  # e.g. ("transformer_blocks.1", ...); None: every block with one output
    period: int = 2

    def __post_init__(self) -> None:
        require_int(self.name, "period", self.period, minimum=1)
        object.__setattr__(self, "blocks", block_names(self.name, self.blocks))

    def _selected(self, graph: fx.Graph) -> list[str]:
        found = _all_blocks(graph)
        if self.blocks is None:
            return [block for block in found if _has_single_output(graph, block)]
        missing = sorted(set(self.blocks) - set(found))
        if missing:
            raise ValueError(f"blocks {missing} not found; the graph's blocks are {found}")
        return [block for block in found if block in self.blocks]  # graph order

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        if self.already_applied(program):
            return PassResult(program, False)
        self.require_one_variant(program)
        blocks = self._selected(program.variants[FULL].graph)
        if not blocks:
            raise PassNotApplicable(
                f"{self.name}: no block of this model has exactly one output; blocks: "
                f"{_all_blocks(program.variants[FULL].graph)}"
            )
        add_variant(program, CACHED, copy_of=FULL)
        for block in blocks:
            boundary = block_boundary(program.variants[FULL].graph, block)
            kind = "residual" if boundary.hidden_input is not None else "output"
            entry = StateEntry(
                f"{block}.cached_{kind}", state_shape(boundary.output), boundary.output.meta["val"].dtype, self.name
            )

            def update(variant, graph, state_input, block=block, kind=kind):
                current = block_boundary(graph, block)  # re-read: rewrites of earlier blocks moved its input
                details = {"block": block, "period": self.period}
                if variant == FULL:
                    annotate(current.output, NodeAnnotation("full", self.name, details=details))
                    if kind == "output":
                        return current.output
                    with graph.inserting_after(current.output):
                        return graph.call_function(aten.sub.Tensor, (current.output, current.hidden_input))
                rebuilt = state_input
                if kind == "residual":
                    with graph.inserting_after(current.output):
                        rebuilt = graph.call_function(aten.add.Tensor, (current.hidden_input, state_input))
                    rebuilt.meta["val"] = current.output.meta["val"]  # later blocks find their input by shape
                    annotate(rebuilt, NodeAnnotation(CACHED, self.name, reason=f"{block} reused", details=details))
                current.output.replace_all_uses_with(rebuilt)
                return state_input

            program = thread_state(program, entry, update)
        remove_dead_code(program.variants[CACHED])
        return PassResult(self.record(dataclasses.replace(program, schedule=Schedule(FULL, CACHED, self.period))), True)


def block_chain(graph: fx.Graph, container: str | None = None) -> list[str]:
    """The blocks of the chain named ``container`` (e.g. ``"transformer_blocks"``) in graph
    order; ``None``: the graph's only chain of two or more blocks."""
    chains = {name: blocks for name, blocks in find_blocks(graph).items() if len(blocks) >= 2}
    if container is not None:
        if container not in chains:
            raise ValueError(f"no chain of blocks named {container!r}; chains: {sorted(chains)}")
        return chains[container]
    if len(chains) != 1:
        raise ValueError(f"found chains of blocks {sorted(chains)}: name one with container=")
    return next(iter(chains.values()))


def _has_single_output(graph: fx.Graph, block: str) -> bool:
    try:
        block_boundary(graph, block)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class FirstBlockCachePass(GraphPass):
    kind: ClassVar[str] = "cache"
    after: ClassVar[tuple[str, ...]] = ("temporal-difference",)

    threshold: float = 0.05
    container: str | None = None  # which chain of blocks (e.g. "transformer_blocks"); None: the only chain

    def __post_init__(self) -> None:
        require_number(self.name, "threshold", self.threshold, minimum=0.0)

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        if self.already_applied(program):
            return PassResult(program, False)
        self.require_one_variant(program)
        graph = program.variants[FULL].graph
        chain = block_chain(graph, self.container)
        first, last = chain[0], chain[-1]
        head, tail = block_boundary(graph, first), block_boundary(graph, last)
        if head.hidden_input is None or _shape(tail.output) != _shape(head.output):
            raise ValueError(
                f"first-block caching needs {first!r} to keep its input's shape and {last!r} to "
                f"return that shape too (a residual chain, as in transformers)"
            )
        probe = add_variant(program, PROBE, copy_of=FULL)
        add_variant(program, CACHED, copy_of=FULL)
        shape, dtype = state_shape(head.output), head.output.meta["val"].dtype
        inputs: dict[str, dict[str, fx.Node]] = {}  # variant -> entry -> its state input

        def entry(name: str) -> StateEntry:
            return StateEntry(f"{first}.{name}", shape, dtype, self.name)

        def first_output(variant, graph, state_input):
            inputs.setdefault(variant, {})["output"] = state_input
            boundary = block_boundary(graph, first)
            if variant == PROBE:
                return boundary.output
            boundary.output.replace_all_uses_with(state_input)  # the probe computed it
            return state_input

        def first_residual(variant, graph, state_input):
            inputs[variant]["residual"] = state_input
            if variant != PROBE:
                return state_input
            boundary = block_boundary(graph, first)
            with graph.inserting_after(boundary.output):
                inputs[PROBE]["new_residual"] = graph.call_function(
                    aten.sub.Tensor, (boundary.output, boundary.hidden_input)
                )
            return inputs[PROBE]["new_residual"]

        def reference_residual(variant, graph, state_input):
            inputs[variant]["reference"] = state_input
            return inputs[variant]["residual"] if variant == FULL else state_input

        def later_blocks_residual(variant, graph, state_input):
            if variant == PROBE:
                return state_input
            output = block_boundary(graph, last).output
            first_block_output = inputs[variant]["output"]
            details = {"first_block": first, "last_block": last, "threshold": self.threshold}
            with graph.inserting_after(output):
                if variant == FULL:
                    annotate(output, NodeAnnotation("full", self.name, details=details))
                    return graph.call_function(aten.sub.Tensor, (output, first_block_output))
                rebuilt = graph.call_function(aten.add.Tensor, (first_block_output, state_input))
            rebuilt.meta["val"] = output.meta["val"]
            annotate(rebuilt, NodeAnnotation(CACHED, self.name, reason=f"blocks after {first} reused", details=details))
            output.replace_all_uses_with(rebuilt)
            return state_input

        for name, update in (
            ("output", first_output),
            ("residual", first_residual),
            ("reference_residual", reference_residual),
            ("later_blocks_residual", later_blocks_residual),
        ):
            program = thread_state(program, entry(name), update)
        finish_probe(
            probe, insert_relative_change(probe.graph, inputs[PROBE]["new_residual"], inputs[PROBE]["reference"])
        )
        for variant in (FULL, CACHED):
            remove_dead_code(program.variants[variant])
        schedule = AdaptiveSchedule(PROBE, self.threshold, refresh=FULL, between=CACHED)
        return PassResult(self.record(dataclasses.replace(program, schedule=schedule)), True)
