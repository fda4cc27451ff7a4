"""Where a diffusers transformer's conditioning vector is made, and adding to it.

Extra knobs (a depth, a target time) join a DiT the way its timestep does: as a vector
added to the conditioning embedding. In diffusers' ``DiTTransformer2DModel``
(``ada_norm_zero``) every block embeds (timestep, class) itself in ``norm1.emb`` (and
the head calls block 0's embedder again); in ``PixArtTransformer2DModel`` one
``adaln_single.emb`` feeds every block and the head.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def conditioning_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are ``model``'s conditioning vectors."""
    adaln_single = getattr(model, "adaln_single", None)
    if adaln_single is not None:
        return [adaln_single.emb]
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and all(hasattr(getattr(b, "norm1", None), "emb") for b in blocks):
        return [block.norm1.emb for block in blocks]
    raise ValueError(
        f"{type(model).__name__}: no conditioning embedder found (expected PixArt's adaln_single.emb or "
        f"DiT's transformer_blocks[i].norm1.emb)"
    )


@contextlib.contextmanager
def added_to_outputs(modules: list[nn.Module], value: torch.Tensor):
    """While active, every call of ``modules`` returns its output plus ``value``."""
    handles = [module.register_forward_hook(lambda _m, _i, out: out + value) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
