"""The reference denoisers: their architectures, training recipes and loading.

Each entry names a diffusers architecture, its config, the scheduler it was trained
with and how it is conditioned. Weights are trained by ``scripts/train_reference.py``
and shipped in ``diffopt/models/weights`` as safetensors; loading never touches the
network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGE_SIZE = 16  # the digits are upsampled from 8x8 to 16x16
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # index of the "no label" embedding used by classifier-free guidance


@dataclass(frozen=True)
class ReferenceModelSpec:
    name: str
    architecture: str  # "dit", "unet", "dit-length-shortcut" (a depth knob) or "dit-flow-map" (a target time)
    # "epsilon" (DDPM, 1000 steps), "flow" (velocity, x_t = (1-t) x0 + t noise) or "flow-map" (F of f = x + (s-t) F)
    objective: str
    config: dict[str, Any]
    scheduler: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    group_size: int | None = None  # dit-length-shortcut: blocks per accumulation group


_DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,  # hidden 128
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=IMAGE_SIZE,
    patch_size=2,  # 64 tokens
    num_embeds_ada_norm=NUM_CLASSES,  # +1 null class for guidance
    norm_type="ada_norm_zero",
)
_UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=16,
    num_class_embeds=NUM_CLASSES + 1,  # +1 null class for guidance
)
# clip_sample: x0 predictions are clamped to the data range [-1, 1] (and epsilon re-derived);
# needed because the cosine schedule's last training step has abar ~ 2e-9
_DDPM_COSINE = dict(
    kind="ddpm", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=1.0
)
_FLOW = dict(kind="flow", timestep_scale=1000.0, prediction_type="velocity")
# constant learning rate after warm-up until decay_start, then cosine decay to lr_min at `steps`
_RECIPE = dict(
    steps=1500, batch_size=128, lr=1e-3, lr_min=1e-5, decay_start=1500, ema_decay=0.998, label_dropout=0.1, seed=0
)

REFERENCE_MODELS: dict[str, ReferenceModelSpec] = {
    spec.name: spec
    for spec in (
        ReferenceModelSpec(
            "dit-digits", "dit", "epsilon", _DIT_CONFIG, _DDPM_COSINE, {**_RECIPE, "steps": 3500, "decay_start": 1500}
        ),
        ReferenceModelSpec(
            "unet-digits",
            "unet",
            "epsilon",
            _UNET_CONFIG,
            _DDPM_COSINE,
            {**_RECIPE, "steps": 3500, "decay_start": 1500},
        ),
        ReferenceModelSpec(
            "dit-digits-flow", "dit", "flow", _DIT_CONFIG, _FLOW, {**_RECIPE, "steps": 3500, "decay_start": 1500}
        ),
        # length-consistency fine-tuning of dit-digits-flow (ODEl, METHODS.md section 3)
        ReferenceModelSpec(
            "dit-digits-flow-odel",
            "dit-length-shortcut",
            "flow",
            _DIT_CONFIG,
            _FLOW,
            {
                **_RECIPE,
                "steps": 2500,
                "lr": 5e-4,
                "decay_start": 1000,
                "teacher": "dit-digits-flow",
                "consistency_fraction": 1 / 8,
            },
            group_size=2,
        ),
        # a few-step flow map distilled from dit-digits-flow with AYF-EMD (METHODS.md section 5)
        ReferenceModelSpec(
            "dit-digits-flowmap",
            "dit-flow-map",
            "flow-map",
            _DIT_CONFIG,
            _FLOW,
            {
                **_RECIPE,
                # shipped run: 1,000 steps decaying from step 500, resumed to 3,000 steps (lr back
                # at 5e-5, decay from 2,500), then to 6,000 (the cosine from 2,500 stretched to
                # 6,000); see its training log
                "steps": 6000,
                "batch_size": 64,
                "lr": 5e-5,  # 2e-4 for 2,000 steps beat Euler at step 250, then diverged (FD 730 at 4 steps)
                "decay_start": 2500,
                "ema_decay": 0.995,
                "teacher": "dit-digits-flow",
                "r_warmup": 500,
            },
        ),
    )
}


def build_architecture(spec: ReferenceModelSpec) -> torch.nn.Module:
    """A randomly initialised model of the spec's architecture."""
    from diffusers import DiTTransformer2DModel, UNet2DModel

    if spec.architecture == "dit":
        return DiTTransformer2DModel(**spec.config)
    if spec.architecture == "dit-length-shortcut":
        from diffopt.models.length_shortcut import LengthShortcutDiT

        return LengthShortcutDiT(DiTTransformer2DModel(**spec.config), spec.group_size)
    if spec.architecture == "dit-flow-map":
        from diffopt.models.flow_map import FlowMapTransformer

        return FlowMapTransformer(DiTTransformer2DModel(**spec.config))
    if spec.architecture == "unet":
        return UNet2DModel(**spec.config)
    raise ValueError(f"unknown architecture {spec.architecture!r} in reference model {spec.name!r}")


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


class UnknownModelError(KeyError):
    """A reference model name that is not in the zoo."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote the message


def get_spec(name: str) -> ReferenceModelSpec:
    if name not in REFERENCE_MODELS:
        raise UnknownModelError(f"unknown reference model {name!r}: available are {sorted(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name]


def load_weights(name: str) -> dict[str, torch.Tensor]:
    """The state dict of a shipped reference model."""
    from safetensors.torch import load_file

    path = weights_path(get_spec(name).name)
    if not path.exists():
        raise FileNotFoundError(
            f"weights for {name!r} are not in {path}. Train them with "
            f"`python scripts/train_reference.py {name}` (they ship with the repository)."
        )
    return load_file(str(path))


def load(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a shipped reference model (eval mode, float32) and its scheduler config."""
    spec = get_spec(name)
    model = build_architecture(spec)
    model.load_state_dict(load_weights(name))
    model.eval()
    return model, dict(spec.scheduler)


def describe(name: str) -> str:
    spec = get_spec(name)
    return json.dumps(
        {
            "name": spec.name,
            "architecture": spec.architecture,
            "objective": spec.objective,
            "config": spec.config,
            "scheduler": spec.scheduler,
        },
        indent=2,
        default=list,
    )


def example_inputs(name: str, batch_size: int = 2) -> tuple[torch.Tensor, ...]:
    """(latent, timestep, class labels) shaped and typed as the reference model expects; a
    flow map's target timestep (below the timestep) comes before the labels."""
    spec = get_spec(name)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    if spec.objective in ("flow", "flow-map"):
        t = torch.rand(batch_size, generator=generator) * spec.scheduler["timestep_scale"]
    else:
        t = torch.randint(0, spec.scheduler["num_train_timesteps"], (batch_size,), generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    if spec.objective == "flow-map":
        return x, t, t * torch.rand(batch_size, generator=generator), labels
    return x, t, labels
