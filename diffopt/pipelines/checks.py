"""What ``enable`` checks against the model before any capture: that its family can be
captured (``UNSUPPORTED_FAMILIES`` are refused by name, with the reason), and that pass
settings fit its module tree (each pass's ``check_model`` hook: a chain pass must find its
chain(s) of blocks, a block cache its named blocks). The messages are the ones the passes
give on the graph (``ir.layers.choose_chain``), seconds instead of minutes earlier."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffopt.passes.base import GraphPass

UNSUPPORTED_FAMILIES = {  # model class -> why capture cannot make one graph of it
    "Lumina2Transformer2DModel": (
        "its forward reads the text mask's values as Python numbers (attention_mask.sum(dim=1).tolist()) and loops "
        "over the batch in Python, so every mask and batch size is a different graph, with shapes taken from the "
        "mask's values; diffopt captures one graph per call signature, not per mask value"
    ),
}


def check_family(model: torch.nn.Module) -> None:
    """Refuse, by name and with the reason, a model family capture cannot handle."""
    reason = UNSUPPORTED_FAMILIES.get(type(model).__name__)
    if reason is not None:
        raise ValueError(
            f"diffopt cannot capture {type(model).__name__}: {reason}. Run this pipeline without diffopt "
            f"(see the README's table of unsupported families)"
        )


def check_passes_fit(model: torch.nn.Module, passes: Sequence[GraphPass]) -> None:
    """Raise ``ValueError`` naming the pass and the setting that does not fit ``model``: each
    pass's own ``check_model`` hook."""
    for graph_pass in passes:
        if not isinstance(graph_pass, GraphPass):
            raise TypeError(f"passes must be GraphPass instances, found {type(graph_pass).__name__}: {graph_pass!r}")
        graph_pass.check_model(model)
