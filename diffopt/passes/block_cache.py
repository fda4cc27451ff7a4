"""Block caching: reuse what whole blocks computed on an earlier step.

``BlockCachePass`` (FORA / DeepCache style, fixed period), a preset of ``passes.caching``
(``blocks`` target, ``periodic`` policy, ``reuse`` predictor). Before: every step runs every
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
from diffopt.ir.blocks import (
    BlockBoundary,
    all_blocks,
    block_chain,
    block_streams,
    first_and_last_streams,
    stream_named,
)
from diffopt.ir.graph_tools import (
    add_variant,
    finish_probe,
    insert_relative_change,
    remove_dead_code,
    state_shape,
    thread_state,
)
from diffopt.ir.program import StepProgram
from diffopt.ir.schedules import AdaptiveSchedule
from diffopt.ir.specs import CACHED, FULL, PROBE, StateEntry
from diffopt.ir.validation import block_names, chain_names, require_int, require_number
from diffopt.passes.base import (
    PassContext,
    PassKind,
    PassNotApplicable,
    VariantPass,
    register_pass,
)
from diffopt.passes.caching.policies import Periodic
from diffopt.passes.caching.predictors import Reuse
from diffopt.passes.caching.rewrite import cache_rewrite
from diffopt.passes.caching.targets import Blocks

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class BlockCachePass(VariantPass):
    kind: ClassVar[PassKind] = PassKind.CACHE
    after: ClassVar[tuple[PassKind, ...]] = (PassKind.TEMPORAL_DIFFERENCE,)

    blocks: tuple[str, ...] | None = None  # e.g. ("transformer_blocks.1", ...); None: every block
    period: int = 2

    def __post_init__(self) -> None:
        require_int(self.name, "period", self.period, minimum=1)
        object.__setattr__(self, "blocks", block_names(self.name, self.blocks))

    def _selected(self, graph: fx.Graph) -> list[str]:
        found = all_blocks(graph)
        if self.blocks is None:
            skipped = {block: "passes no tensor on" for block in found if not block_streams(graph, block)}
            if skipped:
                warnings.warn(f"{self.name} skips blocks {skipped}", stacklevel=2)
            return [block for block in found if block not in skipped]
        missing = sorted(set(self.blocks) - set(found))
        if missing:
            raise ValueError(f"blocks {missing} not found; the graph's blocks are {found}")
        return [block for block in found if block in self.blocks]  # graph order

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
        """The preset: each selected block's residual (or output) reused between refreshes
        every ``period`` steps (``passes.caching``: ``blocks`` x ``periodic`` x ``reuse``)."""
        graph = program.variants[FULL].graph
        blocks = self._selected(graph)
        if not blocks:
            raise PassNotApplicable(f"{self.name}: no block to cache; blocks: {all_blocks(graph)}")
        return cache_rewrite(
            program,
            self.name,
            Blocks(blocks=tuple(blocks)),
            Periodic(self.period),
            Reuse(),
            state_name=lambda target, _: f"{target.name}.cached_{'output' if target.head is None else 'residual'}",
        )


@register_pass
@dataclass(frozen=True)
class FirstBlockCachePass(VariantPass):
    kind: ClassVar[PassKind] = PassKind.CACHE
    after: ClassVar[tuple[PassKind, ...]] = (PassKind.TEMPORAL_DIFFERENCE,)

    threshold: float = 0.05
    container: str | tuple[str, ...] | None = None  # the chain(s) of blocks, see block_chain; None: the only chain

    def __post_init__(self) -> None:
        require_number(self.name, "threshold", self.threshold, minimum=0.0)
        object.__setattr__(self, "container", chain_names(self.name, self.container))

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
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
                    annotate(output, NodeAnnotation(FULL, self.name, details=details))
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
        return dataclasses.replace(program, schedule=schedule)
