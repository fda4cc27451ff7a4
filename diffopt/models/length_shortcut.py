"""A diffusers DiT in the accumulated-displacement (length-shortcut, ODEl) form, in eager torch.

This is the model the length-consistency fine-tuning trains and the independent eager
reference that ``diffopt.passes.length_shortcut.LengthShortcutPass`` is tested against.
The transformation (METHODS.md section 3), for depth ``l`` (a multiple of ``G``):

    h0 = patch embedding of x;  a = h0;  v = 0;  c_i = Emb_i(t, y) + LenEmb(l / G)
    block i < l:  o = Block_i(current, c_i)
        end of a group of G blocks:  a = a + o;  v = v + o;  current = a
        inside a group:              current = o
    out = Head(v, c_0)

Blocks ``l .. D-1`` never run. With ``G = D`` (one group) and a zero length embedding the
full-depth model is the original DiT; with ``G = l`` it is the original DiT truncated
after ``l`` blocks (naive truncation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffopt.models.conditioning import added_to_outputs


class LengthShortcutDiT(nn.Module):
    """``DiTTransformer2DModel`` (ada_norm_zero) with a length knob: ``forward(x, t, y, depth)``."""

    def __init__(self, base: nn.Module, group_size: int):
        super().__init__()
        num_blocks = len(base.transformer_blocks)
        if not isinstance(group_size, int) or group_size < 1 or num_blocks % group_size:
            raise ValueError(f"group_size must be a positive divisor of the {num_blocks} blocks, found {group_size!r}")
        self.base = base
        self.group_size = group_size
        # row l / G conditions depth l (row 0 is unused); zeros: the join starts as a no-op
        self.length_embedding = nn.Embedding(num_blocks // group_size + 1, base.inner_dim)
        nn.init.zeros_(self.length_embedding.weight)

    @property
    def depths(self) -> tuple[int, ...]:
        """The supported depths: every multiple of the group size up to the number of blocks."""
        return tuple(range(self.group_size, len(self.base.transformer_blocks) + 1, self.group_size))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, depth: int) -> torch.Tensor:
        if depth not in self.depths:
            raise ValueError(f"depth must be one of {self.depths}, found {depth!r}")
        base, blocks = self.base, self.base.transformer_blocks
        length = self.length_embedding.weight[depth // self.group_size]
        h0 = base.pos_embed(x)
        with added_to_outputs([block.norm1.emb for block in blocks], length):
            a, v, current = h0, None, h0
            for index in range(depth):
                o = blocks[index](current, timestep=timestep, class_labels=class_labels)
                if (index + 1) % self.group_size == 0:
                    a = a + o
                    v = o if v is None else v + o
                    current = a
                else:
                    current = o
            conditioning = blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=v.dtype)
        shift, scale = base.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        out = base.proj_out_2(base.norm_out(v) * (1 + scale[:, None]) + shift[:, None])
        p, channels = base.patch_size, base.out_channels
        side = int(out.shape[1] ** 0.5)
        out = out.reshape(-1, side, side, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(-1, channels, side * p, side * p)
