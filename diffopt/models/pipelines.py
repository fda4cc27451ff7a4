"""A diffusers pipeline around a shipped model, for examples and benchmarks: ``DiTPipeline``
with ``dit-digits`` denoising pixels directly (``PixelSpace`` stands in for the VAE)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class PixelSpace(torch.nn.Module):
    """The pipeline's "VAE" for a model that denoises pixels: decoding passes latents through."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.device, self.dtype = torch.device("cpu"), torch.float32  # what pipelines ask their components

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=latents)


def digits_pipeline(name: str = "dit-digits"):
    """A ``DiTPipeline`` (DDIM, the model's noise schedule) running the shipped DiT ``name``;
    call it with ``class_labels`` and ``guidance_scale=1.0`` (the model has no ImageNet null class)."""
    from diffusers import DDIMScheduler, DiTPipeline

    from diffopt.models.zoo import load

    model, config = load(name)
    pipe = DiTPipeline(model, PixelSpace(), DDIMScheduler(beta_schedule=config["beta_schedule"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe
