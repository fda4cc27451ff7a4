"""Sampling schedulers: which timesteps a K-step run visits and how x moves between them.

- ``DDPMScheduler``: ancestral sampling, x_{prev} ~ q(x_prev | x_t, x0_hat) (the DDPM
  posterior between the two visited timesteps).
- ``DDIMScheduler``: x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s^2) eps_hat + s z,
  s = eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev)); eta=0 is deterministic.
- ``FlowEulerScheduler``: x_t = (1 - t) x0 + t noise, Euler steps t: 1 -> 0 on a uniform
  grid with the predicted velocity (noise - x0).

``clip_sample=r`` clamps the x0 prediction to [-r, r] and re-derives epsilon from it
(diffusers' ``clip_sample`` with ``use_clipped_model_output``): with schedules whose
first visited step has abar ~ 0, x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) otherwise
amplifies the model's epsilon error by 1/sqrt(abar).

DDPM and DDIM visit K of the T training timesteps with "trailing" spacing
(t_k = round(T - k T/K) - 1, so the first step is always t = T-1) and end at a_prev = 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from diffopt.ir.noise_schedule import CONFIG_KEYS, PREDICTION_TYPES, check_scheduler_config
from diffopt.sampling.diffusers_schedulers import (
    DiffusersScheduler,
    is_diffusers_scheduler,
    scheduler_class_by_keys,
    scheduler_from_config,
)
from diffopt.sampling.noise import make_alphas_cumprod
from diffopt.util.validation import require_int, require_number


class Scheduler(Protocol):
    timesteps: torch.Tensor  # the model's timestep input at each step
    num_steps: int

    def scale_model_input(self, x: torch.Tensor, step_index: int) -> torch.Tensor:
        """The model's latent input at ``step_index`` (called first at every step; step 0 starts a run)."""

    def step(
        self, model_output: torch.Tensor, step_index: int, x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """x at step ``step_index`` -> x at the next step."""


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], found {num_steps}")
    steps = torch.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps, dtype=torch.float64)
    return (steps.round() - 1).to(torch.int64)


def split_prediction(
    model_output: torch.Tensor, x: torch.Tensor, alpha_cumprod: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a model output of the given prediction type."""
    a = alpha_cumprod
    if prediction_type == "epsilon":
        eps = model_output
        return (x - (1 - a) ** 0.5 * eps) / a**0.5, eps
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x - a**0.5 * x0) / (1 - a) ** 0.5
    if prediction_type == "v_prediction":
        return a**0.5 * x - (1 - a) ** 0.5 * model_output, a**0.5 * model_output + (1 - a) ** 0.5 * x
    raise ValueError(f"unknown prediction type {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def clipped_prediction(x0: torch.Tensor, x: torch.Tensor, alpha_cumprod, clip_sample: float | None):
    """(x0, eps) with x0 clamped to [-clip_sample, clip_sample] and eps consistent with it."""
    x0 = x0.clamp(-clip_sample, clip_sample)
    return x0, (x - alpha_cumprod**0.5 * x0) / (1 - alpha_cumprod) ** 0.5


class _UnscaledInput:
    def scale_model_input(self, x: torch.Tensor, step_index: int) -> torch.Tensor:
        """These schedulers feed the model x itself."""
        return x


class _DiscreteScheduler(_UnscaledInput):
    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        num_steps: int,
        prediction_type: str = "epsilon",
        clip_sample: float | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
        require_int(type(self).__name__, "num_steps", num_steps, minimum=1)
        require_number(type(self).__name__, "clip_sample", clip_sample, minimum=0.0, optional=True)
        if num_steps > len(alphas_cumprod):
            raise ValueError(
                f"{type(self).__name__}.num_steps={num_steps} exceeds the {len(alphas_cumprod)} training timesteps"
            )
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.num_steps = num_steps
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.timesteps = trailing_timesteps(len(alphas_cumprod), num_steps)

    def predict(self, model_output: torch.Tensor, x: torch.Tensor, alpha_cumprod: float):
        """(x0_hat, eps_hat), clipped when the scheduler clips."""
        x0, eps = split_prediction(model_output, x, alpha_cumprod, self.prediction_type)
        if self.clip_sample is None:
            return x0, eps
        return clipped_prediction(x0, x, alpha_cumprod, self.clip_sample)

    def alpha_pair(self, step_index: int) -> tuple[float, float]:
        """(a_t, a_prev): cumulative alphas at this step's timestep and the next one (1.0 at the end)."""
        a_t = float(self.alphas_cumprod[self.timesteps[step_index]])
        last = step_index + 1 == self.num_steps
        a_prev = 1.0 if last else float(self.alphas_cumprod[self.timesteps[step_index + 1]])
        return a_t, a_prev


class DDPMScheduler(_DiscreteScheduler):
    def step(self, model_output, step_index, x, generator):
        a_t, a_prev = self.alpha_pair(step_index)
        x0, _ = self.predict(model_output, x, a_t)
        beta = 1 - a_t / a_prev
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        variance = (1 - a_prev) / (1 - a_t) * beta
        if variance == 0.0:
            return mean
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return mean + variance**0.5 * noise


class DDIMScheduler(_DiscreteScheduler):
    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        num_steps: int,
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        clip_sample: float | None = None,
    ):
        super().__init__(alphas_cumprod, num_steps, prediction_type, clip_sample)
        require_number("DDIMScheduler", "eta", eta, minimum=0.0)
        self.eta = eta

    def step(self, model_output, step_index, x, generator):
        a_t, a_prev = self.alpha_pair(step_index)
        x0, eps = self.predict(model_output, x, a_t)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma == 0.0:
            return x_prev
        return x_prev + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


class FlowEulerScheduler(_UnscaledInput):
    """Euler on the flow-matching ODE; the model sees ``timestep_scale * t``."""

    def __init__(self, num_steps: int, timestep_scale: float = 1000.0):
        require_int("FlowEulerScheduler", "num_steps", num_steps, minimum=1)
        require_number("FlowEulerScheduler", "timestep_scale", timestep_scale, minimum=0.0)
        self.num_steps = num_steps
        self.timestep_scale = timestep_scale
        self.times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        self.timesteps = (self.times[:-1] * timestep_scale).to(torch.float32)

    def step(self, model_output, step_index, x, generator):
        dt = float(self.times[step_index + 1] - self.times[step_index])
        return x + dt * model_output


SAMPLER_KINDS = ("ddpm", "ddim", "flow-euler")


def make_scheduler(
    config: Mapping[str, Any] | Any, kind: str | None = None, num_steps: int = 50, eta: float = 0.0
) -> Scheduler:
    """A scheduler for a model's scheduler config (as returned by ``diffopt.models.load``), or
    for a diffusers scheduler (an object, or its config: a mapping with ``_class_name``), which
    then runs as it is (``DiffusersScheduler``; ``kind`` and ``eta`` are its own business).

    Discrete-time models (config ``kind="ddpm"``) sample with ``"ddim"`` (default) or
    ``"ddpm"``; flow-matching models (``kind="flow"``) with ``"flow-euler"``. ``clip_sample``
    is a range, or diffusers' flag (``True``: ``clip_sample_range``, default 1; ``False``: none).
    """
    if is_diffusers_scheduler(config) or (isinstance(config, Mapping) and "_class_name" in config):
        if kind is not None:
            raise ValueError(f"make_scheduler: a diffusers scheduler samples as itself; drop kind={kind!r}")
        scheduler = config if is_diffusers_scheduler(config) else scheduler_from_config(config)
        return DiffusersScheduler(scheduler, num_steps)
    model_kind = check_scheduler_config(config)
    if model_kind == "diffusers":  # a diffusers config copied without its _class_name: its keys name it
        diffusers_class = scheduler_class_by_keys(config)
        if diffusers_class is None:
            raise ValueError(
                f"make_scheduler: config has keys {sorted(set(config) - CONFIG_KEYS)} that diffopt's scheduler "
                f"config does not have, and no diffusers scheduler takes them: pass the scheduler object or its saved "
                f"config (with _class_name)"
            )
        if kind is not None:
            raise ValueError(f"make_scheduler: a diffusers scheduler samples as itself; drop kind={kind!r}")
        return DiffusersScheduler(diffusers_class.from_config(dict(config)), num_steps)
    if model_kind == "flow":
        if kind not in (None, "flow-euler"):
            raise ValueError(f"a flow-matching model samples with 'flow-euler', not {kind!r}")
        return FlowEulerScheduler(num_steps, config.get("timestep_scale", 1000.0))
    alphas_cumprod = make_alphas_cumprod(config.get("beta_schedule", "linear"), config.get("num_train_timesteps", 1000))
    prediction_type = config.get("prediction_type", "epsilon")
    clip_sample = config.get("clip_sample")
    if isinstance(clip_sample, bool):  # diffusers' flag with its range
        clip_sample = config.get("clip_sample_range", 1.0) if clip_sample else None
    kind = kind or "ddim"
    if kind == "ddim":
        return DDIMScheduler(alphas_cumprod, num_steps, eta, prediction_type, clip_sample)
    if kind == "ddpm":
        return DDPMScheduler(alphas_cumprod, num_steps, prediction_type, clip_sample)
    raise ValueError(f"unknown sampler kind {kind!r} for a DDPM-trained model: expected 'ddim' or 'ddpm'")
