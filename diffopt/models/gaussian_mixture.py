"""A closed-form denoiser: exact ``E[x0 | x_t]`` for Gaussian-mixture data.

Data: ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` in D dimensions. Noising is
``x_t = alpha x0 + sigma eps``: DDPM (``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``,
integer timesteps) or flow matching (``alpha = 1 - t``, ``sigma = t``, model timestep
``scale * t``). Given component k, ``x_t ~ N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)`` and

    E[x0 | x_t, k] = mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k),

so ``E[x0 | x_t]`` mixes these with the posterior responsibilities of the components.
epsilon = (x_t - alpha x0_hat) / sigma and velocity = epsilon - x0_hat follow. A class
label k < K conditions on component k; label K (the null class) uses the full mixture.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffopt.sampling.noise import make_alphas_cumprod

OUTPUTS = ("epsilon", "sample", "velocity")


class GaussianMixtureDenoiser(nn.Module):
    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor,
        *,
        sample_shape: tuple[int, ...] | None = None,
        parametrization: str = "ddpm",
        prediction: str = "epsilon",
        beta_schedule: str = "squaredcos_cap_v2",
        num_train_timesteps: int = 1000,
        timestep_scale: float = 1000.0,
    ):
        super().__init__()
        if parametrization not in ("ddpm", "flow"):
            raise ValueError(f"parametrization must be 'ddpm' or 'flow', found {parametrization!r}")
        if prediction not in OUTPUTS:
            raise ValueError(f"prediction must be one of {OUTPUTS}, found {prediction!r}")
        if not (means.dim() == 2 and stds.shape == weights.shape == (means.shape[0],)):
            raise ValueError("expected means (K, D), stds (K,), weights (K,)")
        self.register_buffer("means", means.double())
        self.register_buffer("stds", stds.double())
        self.register_buffer("weights", (weights / weights.sum()).double())
        self.register_buffer("alphas_cumprod", make_alphas_cumprod(beta_schedule, num_train_timesteps))
        self.sample_shape = tuple(sample_shape) if sample_shape else (means.shape[1],)
        if math.prod(self.sample_shape) != means.shape[1]:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {means.shape[1]} values")
        self.parametrization = parametrization
        self.prediction = prediction
        self.timestep_scale = timestep_scale

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def noise_levels(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) per batch item, float64."""
        if self.parametrization == "ddpm":
            abar = self.alphas_cumprod[timestep.long()]
            return abar.sqrt(), (1 - abar).sqrt()
        t = timestep.double() / self.timestep_scale
        return 1 - t, t

    def posterior_mean(
        self, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact ``E[x0 | x_t]`` (float64, flattened to (B, D))."""
        x = x_t.reshape(x_t.shape[0], -1).double()
        a, s = alpha[:, None], sigma[:, None]  # (B, 1)
        variance = a**2 * self.stds[None] ** 2 + s**2  # (B, K)
        centred = x[:, None, :] - a[:, :, None] * self.means[None]  # (B, K, D)
        dims = x.shape[1]
        log_prob = (
            -0.5 * centred.pow(2).sum(-1) / variance
            - 0.5 * dims * torch.log(2 * math.pi * variance)
            + torch.log(self.weights)[None]
        )
        if class_labels is not None:
            conditioned = class_labels < self.num_components
            onehot = nn.functional.one_hot(class_labels.clamp(max=self.num_components - 1), self.num_components)
            mask = torch.where(conditioned[:, None], onehot.bool(), torch.ones_like(onehot, dtype=torch.bool))
            log_prob = log_prob.masked_fill(~mask, -math.inf)
        responsibility = torch.softmax(log_prob, dim=1)  # (B, K)
        gain = (a * self.stds[None] ** 2 / variance)[:, :, None]  # (B, K, 1)
        component_means = self.means[None] + gain * centred
        return (responsibility[:, :, None] * component_means).sum(1)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        alpha, sigma = self.noise_levels(timestep.reshape(-1).expand(x_t.shape[0]))
        x0 = self.posterior_mean(x_t, alpha, sigma, class_labels)
        flat = x_t.reshape(x_t.shape[0], -1).double()
        if self.prediction == "sample":
            out = x0
        else:
            eps = (flat - alpha[:, None] * x0) / sigma[:, None].clamp_min(1e-12)
            out = eps if self.prediction == "epsilon" else eps - x0
        return out.to(x_t.dtype).reshape(x_t.shape)

    def sample_data(
        self, n: int, generator: torch.Generator | None = None, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact draws from the data distribution (or from the labelled components)."""
        if class_labels is None:
            class_labels = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x0 = self.means[class_labels] + self.stds[class_labels, None] * noise
        return x0.float().reshape(n, *self.sample_shape)


def two_moons_mixture(**kwargs) -> GaussianMixtureDenoiser:
    """A 2-D, 4-component mixture with unequal weights and widths (the sampler test case)."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.0]])
    return GaussianMixtureDenoiser(
        means, torch.tensor([0.3, 0.5, 0.2, 0.4]), torch.tensor([0.4, 0.3, 0.2, 0.1]), **kwargs
    )
