"""Rank-r factorisations W ~= A B of a linear layer's weight (W: out x in).

plain SVD: ``W = U S V^T``, ``A = U_r S_r``, ``B = V_r^T``.
channel-aware SVD: factor ``W' = diag(l) W diag(s)`` instead, with output-channel weights
``l`` and input-channel weights ``s`` from calibration, then undo the scaling:
``A = diag(l)^-1 U_r S_r``, ``B = V_r^T diag(s)^-1``. The truncation then keeps what
matters for the activations the layer really sees.
"""
from __future__ import annotations

import torch


def low_rank_factors(weight: torch.Tensor, rank: int, input_weights: torch.Tensor | None = None,
                     output_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: out x r, B: r x in) in the weight's dtype; ``rank`` >= min(out, in) is exact."""
    out_features, in_features = weight.shape
    rank = min(rank, out_features, in_features)
    w = weight.detach().double()
    left = output_weights.double() if output_weights is not None else torch.ones(out_features, dtype=torch.float64)
    right = input_weights.double() if input_weights is not None else torch.ones(in_features, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(left[:, None] * w * right[None, :], full_matrices=False)
    a = (u[:, :rank] * s[:rank]) / left[:, None]
    b = vh[:rank] / right[None, :]
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()
