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
import functools
import warnings
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
from diffopt.ir.layers import choose_chain, find_blocks
from diffopt.ir.program import CACHED, FULL, PROBE, AdaptiveSchedule, Schedule, StateEntry, StepProgram
from diffopt.ir.validation import block_names, chain_names, require_int, require_number
from diffopt.passes.base import (
    GraphPass,
    PassContext,
    PassNotApplicable,
    PassResult,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class BlockBoundary:
    """Where a block meets the rest of the graph: one value it passes on."""

    output: fx.Node  # a value the block passes on
    hidden_input: fx.Node | None  # the one input with the output's shape (None: none, or not one)


def block_streams(graph: fx.Graph, block: str) -> list[BlockBoundary]:
    """Every value ``block`` passes on (one for most blocks; two for SD3 / Flux joint blocks,
    which return the text and image streams), each with its same-shaped input, in graph order."""
    members = {node for node in graph.nodes if block in module_scopes(node)}
    if not members:
        raise ValueError(f"block {block!r} has no nodes in this graph; blocks: {_all_blocks(graph)}")
    external_inputs = {
        arg for node in members for arg in node.all_input_nodes if arg not in members and arg.op != "get_attr"
    }
    streams = []
    for output in (node for node in graph.nodes if node in members and any(u not in members for u in node.users)):
        if _shape(output) is None:  # a size the block computed (PixArt's mask path), not a tensor stream
            continue
        alike = [arg for arg in external_inputs if _shape(arg) == _shape(output)]
        streams.append(BlockBoundary(output, alike[0] if len(alike) == 1 else None))
    return streams


def block_boundary(graph: fx.Graph, block: str) -> BlockBoundary:
    """The one value ``block`` passes on; an error for blocks with several (see ``block_streams``)."""
    streams = block_streams(graph, block)
    if len(streams) != 1:
        raise ValueError(
            f"block {block!r} passes {len(streams)} values on ({[s.output.name for s in streams]}); "
            f"this needs blocks with exactly one output: choose other blocks"
        )
    return streams[0]


def _shape(node: fx.Node) -> tuple[str, ...] | None:
    value = node.meta.get("val")
    return tuple(str(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


def _all_blocks(graph: fx.Graph) -> list[str]:
    return [name for names in find_blocks(graph).values() for name in names]


@dataclass(frozen=True)
class BlockCachePass(GraphPass):
    kind: ClassVar[str] = "cache"
    after: ClassVar[tuple[str, ...]] = ("temporal-difference",)

    blocks: tuple[str, ...] | None = None  # e.g. ("transformer_blocks.1", ...); None: every block
    period: int = 2

    def __post_init__(self) -> None:
        require_int(self.name, "period", self.period, minimum=1)
        object.__setattr__(self, "blocks", block_names(self.name, self.blocks))

    def _selected(self, graph: fx.Graph) -> list[str]:
        found = _all_blocks(graph)
        if self.blocks is None:
            skipped = {block: "passes no tensor on" for block in found if not block_streams(graph, block)}
            if skipped:
                warnings.warn(f"{self.name} skips blocks {skipped}", stacklevel=2)
            return [block for block in found if block not in skipped]
        missing = sorted(set(self.blocks) - set(found))
        if missing:
            raise ValueError(f"blocks {missing} not found; the graph's blocks are {found}")
        return [block for block in found if block in self.blocks]  # graph order

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        if self.already_applied(program):
            return PassResult(program, False)
        self.require_one_variant(program)
        graph = program.variants[FULL].graph
        blocks = self._selected(graph)
        if not blocks:
            raise PassNotApplicable(f"{self.name}: no block to cache; blocks: {_all_blocks(graph)}")
        add_variant(program, CACHED, copy_of=FULL)
        for block in blocks:
            streams = block_streams(graph, block)
            for index, stream in enumerate(streams):
                kind = "residual" if stream.hidden_input is not None else "output"
                suffix = f".stream{index}" if len(streams) > 1 else ""
                out = stream.output
                entry = StateEntry(f"{block}{suffix}.cached_{kind}", state_shape(out), out.meta["val"].dtype, self.name)

                def update(variant, graph, state_input, block=block, name=stream.output.name, kind=kind):
                    current = stream_named(graph, block, name)  # re-read: caching earlier blocks moved its input
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


def stream_named(graph: fx.Graph, block: str, output_name: str) -> BlockBoundary:
    """The stream of ``block`` whose output is the node called ``output_name`` (variants keep names)."""
    for stream in block_streams(graph, block):
        if stream.output.name == output_name:
            return stream
    raise ValueError(f"block {block!r} no longer passes {output_name!r} on")


def block_chain(
    graph: fx.Graph, container: str | tuple[str, ...] | None = None, owner: str = "block_chain"
) -> list[str]:
    """The blocks of the chain named ``container`` (e.g. ``"transformer_blocks"``) in graph
    order; several names join their chains in graph order (Flux: ``("transformer_blocks",
    "single_transformer_blocks")``, as diffusers' hooks walk it); ``None``: the graph's only
    chain of two or more blocks. Errors name ``owner`` (the pass)."""
    chain = set(choose_chain(find_blocks(graph), container, owner))
    first_seen: dict[str, int] = {}  # block -> the index of its first node
    for index, node in enumerate(graph.nodes):
        for scope in chain.intersection(module_scopes(node)):
            first_seen.setdefault(scope, index)
    return sorted(chain, key=first_seen.__getitem__)


@dataclass(frozen=True)
class FirstBlockCachePass(GraphPass):
    kind: ClassVar[str] = "cache"
    after: ClassVar[tuple[str, ...]] = ("temporal-difference",)

    threshold: float = 0.05
    container: str | tuple[str, ...] | None = None  # the chain(s) of blocks, see block_chain; None: the only chain

    def __post_init__(self) -> None:
        require_number(self.name, "threshold", self.threshold, minimum=0.0)
        object.__setattr__(self, "container", chain_names(self.name, self.container))

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        if self.already_applied(program):
            return PassResult(program, False)
        self.require_one_variant(program)
        graph = program.variants[FULL].graph
        chain = block_chain(graph, self.container, self.name)
        first, last = chain[0], chain[-1]
        heads, pairs = first_and_last_streams(graph, first, last)
        probe = add_variant(program, PROBE, copy_of=FULL)
        add_variant(program, CACHED, copy_of=FULL)
        inputs: dict[str, dict[str, fx.Node]] = {}  # variant -> entry -> its state input
        signal_stream = pairs[0][0]  # the head stream the first tail stream continues (the image stream)

        def entry(name: str, stream: BlockBoundary, block: str = first) -> StateEntry:
            suffix = f".stream{heads.index(stream)}" if len(heads) > 1 and block == first else ""
            return StateEntry(
                f"{block}{suffix}.{name}", state_shape(stream.output), stream.output.meta["val"].dtype, self.name
            )

        def first_output(variant, graph, state_input, name):
            inputs.setdefault(variant, {})[name] = state_input
            boundary = stream_named(graph, first, name)
            if variant == PROBE:
                return boundary.output
            boundary.output.replace_all_uses_with(state_input)  # the probe computed it
            return state_input

        def first_residual(variant, graph, state_input):
            inputs[variant]["residual"] = state_input
            if variant != PROBE:
                return state_input
            boundary = stream_named(graph, first, signal_stream.output.name)
            with graph.inserting_after(boundary.output):
                inputs[PROBE]["new_residual"] = graph.call_function(
                    aten.sub.Tensor, (boundary.output, boundary.hidden_input)
                )
            return inputs[PROBE]["new_residual"]

        def reference_residual(variant, graph, state_input):
            inputs[variant]["reference"] = state_input
            return inputs[variant]["residual"] if variant == FULL else state_input

        def later_blocks_residual(variant, graph, state_input, head_name, tail_name):
            if variant == PROBE:
                return state_input
            output = stream_named(graph, last, tail_name).output
            first_block_output = inputs[variant][head_name]
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

        updates = [(entry("output", head), functools.partial(first_output, name=head.output.name)) for head in heads]
        updates += [
            (entry("residual", signal_stream), first_residual),
            (entry("reference_residual", signal_stream), reference_residual),
        ]
        suffixed = len(pairs) > 1
        for index, (head, tail) in enumerate(pairs):
            name = f"{first}{f'.stream{index}' if suffixed else ''}.later_blocks_residual"
            updates.append(
                (
                    StateEntry(name, state_shape(tail.output), tail.output.meta["val"].dtype, self.name),
                    functools.partial(later_blocks_residual, head_name=head.output.name, tail_name=tail.output.name),
                )
            )
        for state_entry, update in updates:
            program = thread_state(program, state_entry, update)
        finish_probe(
            probe, insert_relative_change(probe.graph, inputs[PROBE]["new_residual"], inputs[PROBE]["reference"])
        )
        for variant in (FULL, CACHED):
            remove_dead_code(program.variants[variant])
        schedule = AdaptiveSchedule(PROBE, self.threshold, refresh=FULL, between=CACHED)
        return PassResult(self.record(dataclasses.replace(program, schedule=schedule)), True)


def first_and_last_streams(
    graph: fx.Graph, first: str, last: str
) -> tuple[list[BlockBoundary], list[tuple[BlockBoundary, BlockBoundary]]]:
    """The first block's streams, and (first-block stream, last-block stream) pairs of equal
    shape: one per value the chain passes on (two for joint blocks that end both streams)."""
    heads, tails = block_streams(graph, first), block_streams(graph, last)
    pairs = []
    for tail in tails:
        alike = [head for head in heads if _shape(head.output) == _shape(tail.output)]
        if len(alike) != 1 or alike[0].hidden_input is None:
            raise ValueError(
                f"a residual over blocks {first!r}..{last!r} needs each value {last!r} passes on to continue one "
                f"stream of {first!r} that keeps its input's shape (a residual chain, as in transformers); "
                f"{tail.output.name} "
                f"matches {[h.output.name for h in alike]}"
            )
        pairs.append((alike[0], tail))
    if not pairs:
        raise ValueError(f"{last!r} passes no tensor on")
    return heads, pairs
