"""Pass settings checked against the model's module tree when ``enable`` is called, before
any capture: a chain pass (one with ``container``) must find its chain(s) of blocks, and a
``BlockCachePass`` its named blocks. The messages are the ones the passes give on the
graph (``ir.layers.choose_chain``), seconds instead of minutes earlier."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffopt.ir.layers import choose_chain, module_chains
from diffopt.passes.base import GraphPass


def check_passes_fit(model: torch.nn.Module, passes: Sequence[GraphPass]) -> None:
    """Raise ``ValueError`` naming the pass and the setting that does not fit ``model``."""
    chains = module_chains(model)
    blocks = {block for members in chains.values() for block in members}
    for graph_pass in passes:
        if not isinstance(graph_pass, GraphPass):
            raise TypeError(f"passes must be GraphPass instances, found {type(graph_pass).__name__}: {graph_pass!r}")
        if hasattr(graph_pass, "container"):
            choose_chain(chains, graph_pass.container, graph_pass.name)
        named = getattr(graph_pass, "blocks", None)
        if named is not None and not hasattr(graph_pass, "container"):
            missing = sorted(set(named) - blocks)
            if missing:
                raise ValueError(
                    f"{graph_pass.name}: blocks {missing} are not in {type(model).__name__}; its blocks are "
                    f"{sorted(blocks)}"
                )
