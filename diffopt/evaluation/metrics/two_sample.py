"""Two-sample energy-distance test: are two sets of samples drawn from the same law?

``E(A, B) = 2 E|a - b| - E|a - a'| - E|b - b'|`` (Székely-Rizzo); the p-value is the
fraction of random relabellings of the pooled samples whose statistic is at least the
observed one (permutation test, +1 smoothing).
"""

from __future__ import annotations

import torch


def _energy_statistics(distances: torch.Tensor, in_a: torch.Tensor) -> torch.Tensor:
    """Energy statistic for each labelling column of ``in_a`` (n, P) -> (P,), by matrix products."""
    a = in_a.double()
    b = 1.0 - a
    n_a, n_b = a.sum(0), b.sum(0)
    distances_a = distances @ a
    cross = (b * distances_a).sum(0) / (n_a * n_b)
    within_a = (a * distances_a).sum(0) / (n_a * n_a)
    within_b = (b * (distances @ b)).sum(0) / (n_b * n_b)
    return 2 * cross - within_a - within_b


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    pooled = torch.cat([a.reshape(len(a), -1), b.reshape(len(b), -1)]).double()
    in_a = (torch.arange(len(pooled)) < len(a))[:, None]
    return float(_energy_statistics(torch.cdist(pooled, pooled), in_a)[0])


def energy_test(a: torch.Tensor, b: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """(energy distance, permutation p-value) for samples ``a`` (N, ...) and ``b`` (M, ...)."""
    pooled = torch.cat([a.reshape(len(a), -1), b.reshape(len(b), -1)]).double()
    distances = torch.cdist(pooled, pooled)
    labels = torch.arange(len(pooled)) < len(a)
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([labels[torch.randperm(len(pooled), generator=generator)] for _ in range(permutations)], 1)
    statistics = _energy_statistics(distances, torch.cat([labels[:, None], shuffled], 1))
    observed = statistics[0]
    at_least = int((statistics[1:] >= observed).sum())
    return float(observed), (at_least + 1) / (permutations + 1)
