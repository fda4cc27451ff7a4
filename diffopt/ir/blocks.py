"""Blocks as the graph sees them: the values a block passes on (``block_streams``), the
chain of blocks a cache walks (``block_chain``), and the streams at a chain's two ends
(``first_and_last_streams``). Block caching, first-block caching, forecasting and length
shortcuts all read the graph through these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from diffopt.ir.graph_tools import module_scopes
from diffopt.ir.layers import choose_chain, find_blocks


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
        raise ValueError(f"block {block!r} has no nodes in this graph; blocks: {all_blocks(graph)}")
    external_inputs = {
        arg for node in members for arg in node.all_input_nodes if arg not in members and arg.op != "get_attr"
    }
    streams = []
    for output in (node for node in graph.nodes if node in members and any(u not in members for u in node.users)):
        if value_shape(output) is None:  # a size the block computed (PixArt's mask path), not a tensor stream
            continue
        alike = [arg for arg in external_inputs if value_shape(arg) == value_shape(output)]
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


def value_shape(node: fx.Node) -> tuple[str, ...] | None:
    value = node.meta.get("val")
    return tuple(str(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


def all_blocks(graph: fx.Graph) -> list[str]:
    return [name for names in find_blocks(graph).values() for name in names]


def selected_blocks(
    found: Sequence[str], names: Sequence[str] | None, owner: str, where: str = "the graph's blocks"
) -> list[str]:
    """The blocks of ``found`` (graph order; ``where`` says what they are) that ``names``
    selects (None: all of them); a name not among them is refused, naming it and what there is."""
    missing = sorted(set(names or ()) - set(found))
    if missing:
        raise ValueError(f"{owner}: blocks {missing} not found; {where} are {list(found)}")
    return [block for block in found if names is None or block in names]


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


def first_and_last_streams(
    graph: fx.Graph, first: str, last: str
) -> tuple[list[BlockBoundary], list[tuple[BlockBoundary, BlockBoundary]]]:
    """The first block's streams, and (first-block stream, last-block stream) pairs of equal
    shape: one per value the chain passes on (two for joint blocks that end both streams)."""
    heads, tails = block_streams(graph, first), block_streams(graph, last)
    pairs = []
    for tail in tails:
        alike = [head for head in heads if value_shape(head.output) == value_shape(tail.output)]
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
