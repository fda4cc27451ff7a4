"""Paired fidelity of samples to a baseline run from the same noise: relative L2 and PSNR.

Images live in [-1, 1], so PSNR uses a peak-to-peak range of 2.
"""

from __future__ import annotations

import math

import torch


def relative_l2(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """||samples - reference|| / ||reference|| over the whole batch."""
    return float((samples - reference).norm() / reference.norm().clamp_min(1e-12))


def psnr(samples: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical batches)."""
    mse = float((samples.double() - reference.double()).pow(2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)
