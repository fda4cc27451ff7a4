"""Backends execute one variant of a step program: ``run(variant, inputs) -> outputs``.

``inputs`` are ``(latent, timestep, *conditions, *state)`` and outputs
``(out, *new_state)``, exactly the variant signature, so the torch, onnxruntime and
TensorRT backends are interchangeable under ``OptimizedDenoiser`` and ``Sampler``.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from diffopt.program import StepProgram


class Backend(Protocol):
    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run one variant on flat inputs; return its flat outputs."""


class TorchBackend:
    """Runs the variants' fx graphs eagerly in torch (no autograd)."""

    name = "torch"

    def __init__(self, program: StepProgram):
        self.program = program

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        module = self.program.variants[variant]
        with torch.no_grad():
            return tuple(module(*inputs))
