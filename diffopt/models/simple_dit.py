"""A hand-written class-conditional DiT in plain torch (no diffusers).

The "bring your own nn.Module" example: patchify -> N adaLN-zero transformer blocks ->
final adaLN + linear -> unpatchify. ``forward(x, t, y) -> eps``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class SimpleDiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)
        self.modulation = nn.Linear(hidden, 6 * hidden)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(nn.functional.silu(c))[:, None].chunk(6, dim=-1)
        a = self.norm1(h) * (1 + scale1) + shift1
        b, n, d = a.shape
        q, k, v = self.qkv(a).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + gate1 * self.proj(attention)
        m = self.norm2(h) * (1 + scale2) + shift2
        return h + gate2 * self.fc2(nn.functional.gelu(self.fc1(m), approximate="tanh"))


class SimpleDiT(nn.Module):
    def __init__(
        self,
        image_size: int = 16,
        patch_size: int = 2,
        channels: int = 1,
        hidden: int = 64,
        depth: int = 4,
        heads: int = 4,
        num_classes: int = 10,
    ):
        super().__init__()
        self.patch_size, self.channels, self.hidden = patch_size, channels, hidden
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2, hidden) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden)  # last row: the null class
        self.blocks = nn.ModuleList(SimpleDiTBlock(hidden, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(hidden, 2 * hidden)
        self.head = nn.Linear(hidden, patch_size * patch_size * channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.time_mlp(timestep_embedding(t, self.hidden)) + self.class_embed(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(nn.functional.silu(c))[:, None].chunk(2, dim=-1)
        h = self.head(self.final_norm(h) * (1 + scale) + shift)
        p, g = self.patch_size, self.grid
        h = h.reshape(b, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.channels, g * p, g * p)
