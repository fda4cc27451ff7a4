"""Training loops for the reference denoisers (seeded, resumable, with progress bars).

epsilon objective: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with a DDPM cosine
schedule (1000 steps); the model predicts ``eps``.
flow objective: ``x_t = (1 - t) x0 + t eps``, t ~ U(0, 1); the model (timestep input
``1000 t``) predicts the velocity ``eps - x0``.
Both drop the class label to the null class with probability ``label_dropout`` so the
models support classifier-free guidance, keep an EMA of the weights (the shipped
weights). bf16 autocast is optional: on the 2-core AMD CPU used here it was slower
than fp32 for these small models (1.13 s vs 0.98 s per batch of 128), so it is off.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffopt.evaluation.data import load_digits_split
from diffopt.models.zoo import NULL_CLASS, ReferenceModelSpec, build_architecture
from diffopt.sampling.noise import make_alphas_cumprod
from diffopt.util.files import replacing


def _model_output(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
    if hasattr(model, "config") and "num_class_embeds" in model.config:  # UNet2DModel
        return model(x, t, class_labels=labels, return_dict=False)[0]
    return model(x, timestep=t, class_labels=labels, return_dict=False)[0]


def denoising_loss(
    spec: ReferenceModelSpec,
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """One Monte-Carlo estimate of the spec's training objective on a batch."""
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    if spec.objective == "epsilon":
        t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator)
        a = alphas_cumprod[t].float().view(n, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target, model_t = noise, t
    elif spec.objective == "flow":
        t = torch.rand(n, generator=generator)
        tb = t.view(n, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        target, model_t = noise - x0, t * spec.scheduler["timestep_scale"]
    else:
        raise ValueError(f"unknown objective {spec.objective!r}")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.training.get("bf16_autocast", False)):
        prediction = _model_output(model, x_t, model_t, labels)
    return F.mse_loss(prediction.float(), target)


def lr_at(recipe: dict, steps: int, step: int) -> float:
    """Linear warm-up (200 steps), constant until ``decay_start``, cosine decay to ``lr_min`` at ``steps``."""
    warm = min(1.0, (step + 1) / 200)
    if step < recipe["decay_start"] or steps <= recipe["decay_start"]:
        return recipe["lr"] * warm
    progress = (step - recipe["decay_start"]) / (steps - recipe["decay_start"])
    return recipe["lr_min"] + 0.5 * (recipe["lr"] - recipe["lr_min"]) * (1 + math.cos(math.pi * progress))


class TrainingRun:
    """What a seeded, resumable training loop carries: model, EMA copy, AdamW and the data
    generator, saved together every ``checkpoint_every`` steps to ``checkpoint_path``."""

    def __init__(self, model: torch.nn.Module, recipe: dict, checkpoint_path: Path, checkpoint_every: int = 250):
        self.model, self.recipe = model.eval(), recipe  # no dropout / batch norm: label dropout is explicit
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(recipe["seed"])
        self.checkpoint_path, self.checkpoint_every = checkpoint_path, checkpoint_every
        self.start = 0
        if checkpoint_path.exists():
            state = torch.load(checkpoint_path, weights_only=False)
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            self.start = state["step"]

    def batch(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of (images, labels), labels dropped to the null class at ``label_dropout``."""
        idx = torch.randint(0, len(data.labels), (self.recipe["batch_size"],), generator=self.generator)
        x0, labels = data.images[idx], data.labels[idx].clone()
        labels[torch.rand(labels.shape, generator=self.generator) < self.recipe["label_dropout"]] = NULL_CLASS
        return x0, labels

    def update(self, loss: torch.Tensor, step: int, steps: int) -> None:
        """One optimizer step at the recipe's learning rate for ``step``, the EMA, and a checkpoint when due."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.recipe, steps, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
                p_ema.lerp_(p, 1 - self.recipe["ema_decay"])
        if (step + 1) % self.checkpoint_every == 0 or step + 1 == steps:
            with replacing(self.checkpoint_path) as partial:  # a kill while saving keeps the last checkpoint
                self._save_checkpoint(partial, step)

    def _save_checkpoint(self, path, step: int) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "step": step + 1,
            },
            path,
        )


def train_reference_model(
    spec: ReferenceModelSpec, checkpoint_path: Path, steps: int | None = None, checkpoint_every: int = 250
) -> torch.nn.Module:
    """Train (or resume training of) ``spec``; returns the EMA model."""
    recipe = spec.training
    steps = steps or recipe["steps"]
    torch.manual_seed(recipe["seed"])
    run = TrainingRun(build_architecture(spec), recipe, checkpoint_path, checkpoint_every)
    data = load_digits_split("train")
    alphas_cumprod = (
        make_alphas_cumprod(spec.scheduler["beta_schedule"], spec.scheduler["num_train_timesteps"])
        if spec.objective == "epsilon"
        else None
    )
    bar = tqdm(range(run.start, steps), initial=run.start, total=steps, desc=f"train {spec.name}")
    for step in bar:
        x0, labels = run.batch(data)
        loss = denoising_loss(spec, run.model, x0, labels, alphas_cumprod, run.generator)
        run.update(loss, step, steps)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return run.ema


def length_consistency_loss(
    model: torch.nn.Module,
    ema: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    timestep_scale: float,
    consistency_fraction: float,
) -> torch.Tensor:
    """ODEl's fine-tuning objective for a ``LengthShortcutDiT``: every sample draws a depth;
    the flow-matching velocity is the target, except for the last ``consistency_fraction``
    of the batch, which regresses onto the EMA model's output at another random depth.
    Samples run grouped by depth, so each costs only the blocks of its depth."""
    n, depths = x0.shape[0], torch.tensor(model.depths)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.rand(n, generator=generator)
    x_t = (1 - t.view(n, 1, 1, 1)) * x0 + t.view(n, 1, 1, 1) * noise
    model_t = t * timestep_scale
    target = noise - x0
    index = torch.randint(0, len(depths), (n,), generator=generator)
    other = (index + torch.randint(1, max(len(depths), 2), (n,), generator=generator)) % len(depths)
    consistent = torch.arange(n) >= n - round(n * consistency_fraction)
    with torch.no_grad():
        for i in other[consistent].unique().tolist():
            rows = consistent & (other == i)
            target[rows] = ema(x_t[rows], model_t[rows], labels[rows], int(depths[i]))
    squared_error = x0.new_zeros(())
    for i in index.unique().tolist():
        rows = index == i
        prediction = model(x_t[rows], model_t[rows], labels[rows], int(depths[i]))
        squared_error = squared_error + (prediction - target[rows]).square().sum()
    return squared_error / target.numel()


def train_length_shortcut(
    spec: ReferenceModelSpec, checkpoint_path: Path, steps: int | None = None, checkpoint_every: int = 250
) -> torch.nn.Module:
    """Fine-tune (or resume fine-tuning) a ``LengthShortcutDiT`` from its flow teacher
    (``spec.training["teacher"]``); returns the EMA model."""
    from diffopt.models.zoo import load_weights

    recipe = spec.training
    steps = steps or recipe["steps"]
    torch.manual_seed(recipe["seed"])
    model = build_architecture(spec)
    model.base.load_state_dict(load_weights(recipe["teacher"]))
    run = TrainingRun(model, recipe, checkpoint_path, checkpoint_every)
    data = load_digits_split("train")
    bar = tqdm(range(run.start, steps), initial=run.start, total=steps, desc=f"fine-tune {spec.name}")
    for step in bar:
        x0, labels = run.batch(data)
        loss = length_consistency_loss(
            run.model,
            run.ema,
            x0,
            labels,
            run.generator,
            spec.scheduler["timestep_scale"],
            recipe["consistency_fraction"],
        )
        run.update(loss, step, steps)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return run.ema
