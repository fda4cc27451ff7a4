"""The sampler interface: ``sample(denoiser, conditions, *, shape, noise, seed)``.

Every sampler (``sequential.Sampler``, ``flow_map.FlowMapSampler``,
``speculative.SpeculativeDDPMSampler``) is a ``SamplingLoop``: this class owns the public
signature and its meaning, and each sampler writes only ``_sample``, its loop. A run starts
from ``noise`` (copied) or from noise of ``shape`` drawn from ``seed`` on the CPU (the same on
every device); ``conditions`` hold one entry per sample; every stochastic choice of the run
draws from generators seeded by ``seed``, so equal arguments give equal samples. The run's
statistics are in ``last_stats`` afterwards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch


class SamplingLoop(ABC):
    """A sampler (see the module docstring)."""

    last_stats: Any

    def sample(
        self,
        denoiser: Callable,
        conditions: Sequence[torch.Tensor] = (),
        *,
        shape: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Draw a batch of samples with ``denoiser`` (an ``OptimizedDenoiser`` or a plain model
        ``model(x, t, *conditions)``); exactly one of ``shape`` and ``noise``."""
        return self._sample(denoiser, tuple(conditions), shape, noise, seed)

    @abstractmethod
    def _sample(
        self,
        denoiser: Callable,
        conditions: tuple[torch.Tensor, ...],
        shape: Sequence[int] | None,
        noise: torch.Tensor | None,
        seed: int,
    ) -> torch.Tensor:
        """The sampler's loop, on ``sample``'s arguments."""
