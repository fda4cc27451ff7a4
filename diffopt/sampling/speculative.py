"""Autospeculative decoding (ASD): exact parallel K-step DDPM with the same model.

Stochastic-localization form of DDPM: with ``tau = abar / (1 - abar)`` and
``y = sqrt(tau (1 + tau)) x_t``, ancestral DDPM over the visited timesteps is exactly

    y_{k+1} = y_k + eta_k m(y_k) + sqrt(eta_k) xi_k,   eta_k = tau_{k+1} - tau_k,

with drift ``m(y_k) = E[x0 | x_t]`` (the model's x0-prediction); the final step returns
``m(y_{K-1})`` (abar = 1). One ROUND per sample, from y_k with a proposal drift m_p:

1. draft up to L transitions by cumulative sum with m_p frozen and fresh xi (no calls);
2. ONE batched model call evaluates the drift at every drafted point (each batch item
   at its own timestep, all samples of the batch together), plus y_k itself when its
   drift is not known yet;
3. accept transition i with probability min(1, N(z; eta m_i, eta) / N(z; eta m_p, eta))
   in float64 log space, m_i the exact drift at its start point; at the first
   rejection, replace the draft by its reflection xi' = xi - 2 (e.xi) e,
   e = (m_i - m_p)/|m_i - m_p| (reflection-maximal coupling), drop later drafts.

Every transition is thus an exact draw from its DDPM conditional, so the output law
equals sequential DDPM. A transition whose proposal drift is exact is always accepted,
so with L = 1 the sampler IS sequential DDPM, draw for draw. After a rejection the new
point's drift is unknown; the next round uses the drift at the rejected draft point as
its proposal and evaluates the new point in its batch (choice documented here because
the method's description leaves it open).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from diffopt.ir.signature import first_tensor_output
from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.sampling.interface import SamplingLoop
from diffopt.sampling.schedulers import PREDICTION_TYPES, split_prediction, trailing_timesteps
from diffopt.sampling.sequential import check_null_conditions, combine_guidance, guidance_inputs, initial_noise
from diffopt.util.validation import require_int, require_number


@dataclass
class SpeculativeStats:
    """Per run: sequential depth (rounds), model work, acceptance per DDPM step, wall time."""

    num_steps: int
    rounds: int = 0
    model_evaluations: int = 0  # batch items evaluated, over all rounds (CFG halves count once)
    # per DDPM transition k -> k+1: acceptance tests made, accepted, and the sum of the
    # predicted acceptance probabilities 2 Phi(-sqrt(eta) |m_k - m_proposal| / 2)
    proposed: torch.Tensor | None = None
    accepted: torch.Tensor | None = None
    predicted_acceptance: torch.Tensor | None = None
    wall_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / tested transitions (1.0 when nothing was tested, e.g. K = 1)."""
        tested = int(self.proposed.sum())
        return float(self.accepted.sum()) / tested if tested else 1.0

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "rounds": self.rounds,
            "model_evaluations": self.model_evaluations,
            "acceptance_rate": self.acceptance_rate,
            "wall_time_s": self.wall_time_s,
        }


def _model_call(denoiser: OptimizedDenoiser | Callable, x, t, conditions) -> torch.Tensor:
    if isinstance(denoiser, OptimizedDenoiser):
        return denoiser.step(0, x, t, *conditions)[0]
    with torch.no_grad():
        return first_tensor_output(denoiser(x, t, *conditions))


class SpeculativeDDPMSampler(SamplingLoop):
    """Exact parallel sampling of K-step ancestral DDPM (trailing timestep spacing)."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        num_steps: int,
        *,
        window: int | None = None,
        prediction_type: str = "epsilon",
        guidance_scale: float = 1.0,
        null_conditions: Sequence[torch.Tensor] | None = None,
        clip_sample: float | None = None,
        progress: bool = True,
    ):
        owner = "SpeculativeDDPMSampler"
        if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dim() != 1 or len(alphas_cumprod) < 2:
            raise ValueError(
                f"{owner}: alphas_cumprod must be a 1-d tensor of the training schedule, found {alphas_cumprod!r:.60}"
            )
        require_int(owner, "num_steps", num_steps, minimum=1)
        if num_steps > len(alphas_cumprod):
            raise ValueError(f"{owner}.num_steps {num_steps} exceeds the {len(alphas_cumprod)} training timesteps")
        require_int(owner, "window", window, minimum=1, optional=True)  # None: speculate until the first rejection
        require_number(owner, "guidance_scale", guidance_scale)
        require_number(owner, "clip_sample", clip_sample, minimum=0.0, optional=True)
        if clip_sample == 0:
            raise ValueError(f"{owner}.clip_sample must be > 0 (the clamp of the x0-prediction) or None, found 0")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
        if guidance_scale != 1.0 and null_conditions is None:
            raise ValueError("classifier-free guidance needs null_conditions (e.g. (torch.tensor(10),))")
        self.num_steps = num_steps
        self.window = window
        self.prediction_type = prediction_type
        self.guidance_scale = guidance_scale
        self.null_conditions = tuple(null_conditions or ())
        self.clip_sample = clip_sample  # clamp the drift (x0-prediction), as the sequential scheduler does
        self.progress = progress
        self.timesteps = trailing_timesteps(len(alphas_cumprod), num_steps)
        self.abar = alphas_cumprod.double()[self.timesteps]  # (K,)
        self.tau = self.abar / (1 - self.abar)
        self.eta = self.tau[1:] - self.tau[:-1]  # (K-1,) increments between visited steps
        self.last_stats = SpeculativeStats(num_steps)

    def _drift(self, denoiser, y: torch.Tensor, steps: torch.Tensor, conditions) -> torch.Tensor:
        """m(y, tau_k) = x0-prediction at x_t = y / sqrt(tau (1 + tau)), per item (float64)."""
        shape = (-1,) + (1,) * (y.dim() - 1)
        tau, abar = self.tau[steps].view(shape), self.abar[steps].view(shape)
        x = (y / (tau * (1 + tau)).sqrt()).float()
        t = self.timesteps[steps]
        # the round's float64 bookkeeping stays on the CPU (it is O(batch x window x pixels), small next to
        # the model call); only the batched model call runs on the denoiser's device
        device = denoiser.device if isinstance(denoiser, OptimizedDenoiser) else x.device
        model_inputs = guidance_inputs(x, t, conditions, self.guidance_scale, self.null_conditions)
        x_model, t_model = (value.to(device) for value in model_inputs[:2])
        conditions_model = tuple(c.to(device) for c in model_inputs[2])
        out = _model_call(denoiser, x_model, t_model, conditions_model).to("cpu")
        out = combine_guidance(out.double(), self.guidance_scale)
        x0, _ = split_prediction(out, x.double(), abar, self.prediction_type)
        return x0 if self.clip_sample is None else x0.clamp(-self.clip_sample, self.clip_sample)

    def _sample(
        self,
        denoiser: OptimizedDenoiser | Callable,
        conditions: tuple[torch.Tensor, ...],
        shape: Sequence[int] | None,
        noise: torch.Tensor | None,
        seed: int,
    ) -> torch.Tensor:
        """Draw a batch of independent samples; ``last_stats`` holds the run's statistics."""
        if isinstance(denoiser, OptimizedDenoiser) and denoiser.is_stateful:
            raise ValueError(
                "speculative sampling evaluates many timesteps in one call, so it needs a stateless "
                "denoiser; this step program carries state between steps"
            )
        # the same draws as the sequential Sampler; bookkeeping stays on the CPU (see _drift)
        x_start, generator = initial_noise("SpeculativeDDPMSampler.sample", shape, noise, seed)
        x_start = x_start.cpu()
        acceptance_generator = torch.Generator().manual_seed((seed + 1_000_003) % 2**64)
        conditions = tuple(conditions)
        if self.guidance_scale != 1.0:
            check_null_conditions("SpeculativeDDPMSampler", self.null_conditions, conditions)
        K, B = self.num_steps, x_start.shape[0]
        sample_shape = x_start.shape[1:]
        started = time.perf_counter()
        transitions = max(K - 1, 0)
        stats = SpeculativeStats(
            K,
            proposed=torch.zeros(transitions, dtype=torch.long),
            accepted=torch.zeros(transitions, dtype=torch.long),
            predicted_acceptance=torch.zeros(transitions, dtype=torch.float64),
        )
        y = (self.tau[0] * (1 + self.tau[0])).sqrt() * x_start.double()
        k = torch.zeros(B, dtype=torch.long)  # current step index per sample
        drift = self._drift(denoiser, y, k, conditions)  # round 1: the drift at the starting noise
        drift_known = torch.ones(B, dtype=torch.bool)  # else `drift` is only the proposal drift
        stats.rounds, stats.model_evaluations = 1, B
        done = torch.zeros(B, dtype=torch.bool)
        result = torch.empty_like(y)
        if K == 1:
            done[:] = True
            result = drift.clone()
        bar = tqdm(total=K * B, desc="speculative DDPM", disable=not self.progress, leave=False)
        while not bool(done.all()):
            active = (~done).nonzero().flatten()
            window = self.window if self.window is not None else K
            lengths = torch.clamp(K - 1 - k[active], max=window)  # transitions drafted this round
            W = int(lengths.max())
            # 1. draft: cumulative sum with the proposal drift frozen
            # drawn in the sample dtype (as the sequential Sampler does), then widened
            xi = torch.randn((len(active), W, *sample_shape), generator=generator, dtype=x_start.dtype).double()
            steps = (k[active, None] + torch.arange(W)[None]).clamp(max=max(K - 2, 0))  # transition index
            valid = torch.arange(W)[None] < lengths[:, None]
            bshape = (len(active), W) + (1,) * len(sample_shape)
            eta = self.eta[steps].view(bshape) if K > 1 else torch.zeros(bshape, dtype=torch.float64)
            increments = eta * drift[active, None] + eta.sqrt() * xi
            points = torch.cat([y[active, None], y[active, None] + increments.cumsum(1)], 1)  # (A, W+1)
            # 2. one batched call: every drafted point, and y_k where its drift is unknown
            evaluate = torch.cat([~drift_known[active, None], valid], 1)  # (A, W+1) over points 0..W
            item_sample, item_point = evaluate.nonzero(as_tuple=True)
            item_steps = k[active][item_sample] + item_point
            drifts = torch.zeros_like(points)
            drifts[item_sample, item_point] = self._drift(
                denoiser, points[item_sample, item_point], item_steps, tuple(c[active][item_sample] for c in conditions)
            )
            stats.rounds += 1
            stats.model_evaluations += len(item_sample)
            drifts[:, 0] = torch.where(
                drift_known[active].view(-1, *[1] * len(sample_shape)), drift[active], drifts[:, 0]
            )
            # 3. sequential acceptance (vectorised: find each sample's first rejection)
            target = drifts[:, :W]  # exact drift at each transition's start point
            proposal_mean, target_mean = eta * drift[active, None], eta * target
            flat = lambda v: v.flatten(2).pow(2).sum(-1)  # noqa: E731
            log_ratio = (flat(increments - proposal_mean) - flat(increments - target_mean)) / (
                2 * eta.flatten(2)[..., 0].clamp_min(1e-300)
            )
            uniform = torch.rand(log_ratio.shape, generator=acceptance_generator, dtype=torch.float64)
            accept = (torch.log(uniform) < log_ratio.clamp(max=0.0)) & valid
            rejected = valid & ~accept
            first_rejection = torch.where(rejected.any(1), rejected.float().argmax(1), lengths) if W > 0 else lengths
            difference = (target - drift[active, None]).flatten(2).norm(dim=-1) * eta.flatten(2)[..., 0].sqrt()
            predicted = 2 * torch.distributions.Normal(0.0, 1.0).cdf(-difference / 2)
            tested = (torch.arange(W)[None] <= first_rejection[:, None]) & valid
            stats.proposed.index_add_(0, steps[tested], torch.ones_like(steps[tested]))
            stats.accepted.index_add_(0, steps[tested], accept[tested].long())
            stats.predicted_acceptance.index_add_(0, steps[tested], predicted[tested])
            # advance: accepted windows move to their last draft (drift known there); a rejection
            # at transition r moves to the reflection of draft r (drift unknown, proposal = drift
            # at the rejected draft point)
            rows = torch.arange(len(active))
            was_rejected = first_rejection < lengths
            r = first_rejection.clamp(max=max(W - 1, 0))
            column = lambda v: v.view(-1, *[1] * len(sample_shape))  # noqa: E731
            y_accepted = points[rows, lengths]
            if W > 0:
                step_eta = eta[rows, r]
                d = (target[rows, r] - drift[active]).flatten(1)
                e = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
                noise_r = xi[rows, r].flatten(1)
                reflected = (noise_r - 2 * (e * noise_r).sum(1, keepdim=True) * e).view(-1, *sample_shape)
                y_rejected = points[rows, r] + step_eta * target[rows, r] + step_eta.sqrt() * reflected
                y[active] = torch.where(column(was_rejected), y_rejected, y_accepted)
                drift[active] = torch.where(
                    column(was_rejected), drifts[rows, (r + 1).clamp(max=W)], drifts[rows, lengths]
                )
            else:
                y[active], drift[active] = y_accepted, drifts[rows, lengths]
            drift_known[active] = ~was_rejected
            k[active] += torch.where(was_rejected, first_rejection + 1, lengths)
            finished = active[(k[active] == K - 1) & drift_known[active]]
            result[finished] = drift[finished]  # the last DDPM step returns x0_hat = m(y_{K-1})
            done[finished] = True
            bar.n = int(k.sum()) + int(done.sum())
            bar.refresh()
        bar.close()
        stats.wall_time_s = time.perf_counter() - started
        self.last_stats = stats
        return result.to(x_start.dtype)
