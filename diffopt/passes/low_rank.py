"""Rank-r factorisations W ~= A B of a linear layer's weight (W: out x in).

plain SVD: ``W = U S V^T``, ``A = U_r S_r``, ``B = V_r^T``.
channel-aware SVD: factor ``W' = diag(l) W diag(s)`` instead, with output-channel weights
``l`` and input-channel weights ``s`` from calibration, then undo the scaling:
``A = diag(l)^-1 U_r S_r``, ``B = V_r^T diag(s)^-1``. The truncation then keeps what
matters for the activations the layer really sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _scaled(weight: torch.Tensor, input_weights: torch.Tensor | None, output_weights: torch.Tensor | None):
    out_features, in_features = weight.shape
    left = output_weights.double() if output_weights is not None else torch.ones(out_features, dtype=torch.float64)
    right = input_weights.double() if input_weights is not None else torch.ones(in_features, dtype=torch.float64)
    return left, right, left[:, None] * weight.detach().double() * right[None, :]


def low_rank_factors(
    weight: torch.Tensor,
    rank: int,
    input_weights: torch.Tensor | None = None,
    output_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: out x r, B: r x in) in the weight's dtype; ``rank`` >= min(out, in) is exact."""
    rank = min(rank, *weight.shape)
    left, right, scaled = _scaled(weight, input_weights, output_weights)
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    a = (u[:, :rank] * s[:rank]) / left[:, None]
    b = vh[:rank] / right[None, :]
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()


def ranks_under_budget(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]], budget: float
) -> list[int]:
    """Per-layer ranks for ``layers`` = [(weight, input_weights, output_weights)] whose
    low-rank cost ``sum r_i (m_i + n_i)`` stays within ``budget`` times their full cost
    ``sum m_i n_i`` (MACs per token). Ranks are handed out greedily by the share of its
    layer's (channel-weighted) spectral energy that one more rank keeps, per MAC it costs;
    a layer's shares only shrink with rank, so the greedy order is each layer's prefix."""
    if not 0 < budget <= 1:
        raise ValueError(f"the MAC budget is a fraction of the layers' full cost in (0, 1], found {budget}")
    candidates, full_cost = [], 0
    for index, (weight, input_weights, output_weights) in enumerate(layers):
        out_features, in_features = weight.shape
        full_cost += out_features * in_features
        energy = torch.linalg.svdvals(_scaled(weight, input_weights, output_weights)[2]).pow(2)
        shares = (energy / energy.sum()).tolist()
        candidates += [(share / (out_features + in_features), index, out_features + in_features) for share in shares]
    ranks, spent, closed = [0] * len(layers), 0, set()
    for _, index, cost in sorted(candidates, key=lambda c: -c[0]):
        if index in closed:
            continue
        if spent + cost > budget * full_cost:
            closed.add(index)  # keep every layer's ranks a prefix of its spectrum
            continue
        ranks[index] += 1
        spent += cost
    return ranks
