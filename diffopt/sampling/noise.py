"""Discrete DDPM noise schedules: beta schedule name -> cumulative alpha products.

``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)`` for the training timesteps
``t = 0..T-1``; the same formulas as diffusers' ``DDPMScheduler`` so models trained
with either agree.
"""

from __future__ import annotations

import math

import torch

from diffopt.ir.noise_schedule import BETA_SCHEDULES


def make_betas(
    beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
) -> torch.Tensor:
    """Betas (float64) of a named schedule."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
            dtype=torch.float64,
        )
    raise ValueError(f"unknown beta schedule {beta_schedule!r}: expected one of {BETA_SCHEDULES}")


def make_alphas_cumprod(beta_schedule: str, num_train_timesteps: int = 1000, **beta_range) -> torch.Tensor:
    """Cumulative products of ``1 - beta`` (float64), index = training timestep."""
    return torch.cumprod(1.0 - make_betas(beta_schedule, num_train_timesteps, **beta_range), dim=0)
