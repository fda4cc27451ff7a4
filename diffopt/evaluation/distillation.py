"""Flow-map distillation with the Eulerian objective (AYF-EMD, METHODS.md section 5).

A flow map ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)`` is exact when it is constant
along the teacher's ODE trajectories: ``d/dt f(x_t, t, s) = 0`` with ``dx_t/dt = v``,
i.e. ``(F - v) + (t - s) dF/dt = 0`` where ``dF/dt = dF/dx . v + dF/dt``. One step:

    (F, dF) = jvp(F_sg, (x_t, t), (v, 1))         # no gradient through this (stop-gradient)
    g = (F - v) + r (t - s) dF;   g <- g / (|g| + 0.1)      # per-sample norm
    loss = |F_theta(x_t, t, s) - sg(F - g)|^2

so the gradient step moves F along -g. ``r`` warms up from 0 (pure flow matching of
``F`` toward ``v``) to 0.99. Times here are flow times in [0, 1]; the digits models see
``timestep_scale * t``. The forward-mode JVP needs attention's math kernel on CPU (the
fused one has no forward-mode derivative).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from diffopt.evaluation.data import load_digits_split
from diffopt.evaluation.training import TrainingRun
from diffopt.models.zoo import NULL_CLASS, ReferenceModelSpec, build_architecture, load, load_weights

FlowMap = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # F(x, t, s), flow times


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def ayf_emd_loss(
    student: FlowMap, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, velocity: torch.Tensor, r: float
) -> torch.Tensor:
    """The AYF-EMD loss of ``student`` at ``(x_t, t, s)`` given the teacher's ``velocity`` there."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        value, derivative = jvp(lambda x, time: student(x, time, s), (x_t, t), (velocity, torch.ones_like(t)))
    g = (value - velocity) + r * _per_sample(t - s, x_t) * derivative
    g = g / (_per_sample(g.flatten(1).norm(dim=1), g) + 0.1)
    return (student(x_t, t, s) - (value - g)).square().mean()


def r_at(step: int, warmup_steps: int, final: float = 0.99) -> float:
    """The tangent weight ``r``: linear from 0 to ``final`` over ``warmup_steps``."""
    return final * min(1.0, step / max(warmup_steps, 1))


def draw_times(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) pairs with 0 <= s <= t <= 1: t uniform, s uniform below it."""
    t = torch.rand(n, generator=generator)
    return t, t * torch.rand(n, generator=generator)


def train_flow_map(
    spec: ReferenceModelSpec, checkpoint_path: Path, steps: int | None = None, checkpoint_every: int = 250
) -> torch.nn.Module:
    """Distil (or resume distilling) the flow map ``spec`` from its flow teacher
    (``spec.training["teacher"]``, frozen; optional ``guidance`` > 1: a classifier-free
    guided teacher); returns the EMA flow map."""
    recipe = spec.training
    steps = steps or recipe["steps"]
    torch.manual_seed(recipe["seed"])
    teacher, scheduler = load(recipe["teacher"])
    teacher.requires_grad_(False)
    scale, guidance = scheduler["timestep_scale"], recipe.get("guidance", 1.0)
    model = build_architecture(spec)
    model.base.load_state_dict(load_weights(recipe["teacher"]))
    run = TrainingRun(model, recipe, checkpoint_path, checkpoint_every)
    data = load_digits_split("train")

    def velocity(x, t, labels):
        with torch.no_grad():
            v = teacher(x, timestep=t * scale, class_labels=labels, return_dict=False)[0]
            if guidance != 1.0:
                null = torch.full_like(labels, NULL_CLASS)
                unconditional = teacher(x, timestep=t * scale, class_labels=null, return_dict=False)[0]
                v = unconditional + guidance * (v - unconditional)
        return v

    bar = tqdm(range(run.start, steps), initial=run.start, total=steps, desc=f"distil {spec.name}")
    for step in bar:
        x0, labels = run.batch(data)
        noise = torch.randn(x0.shape, generator=run.generator)
        t, s = draw_times(len(x0), run.generator)
        x_t = (1 - _per_sample(t, x0)) * x0 + _per_sample(t, x0) * noise

        def student(x, time, target, labels=labels):
            return run.model(x, time * scale, target * scale, labels)

        loss = ayf_emd_loss(student, x_t, t, s, velocity(x_t, t, labels), r_at(step, recipe["r_warmup"]))
        run.update(loss, step, steps)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return run.ema
