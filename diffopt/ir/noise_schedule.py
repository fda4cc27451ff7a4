"""A noise-schedule config, as data: what a model's scheduler config (``diffopt.models.zoo``)
may hold, checked without building a scheduler.

A bundle's manifest carries its model's config and is checked on load (``runtime.bundle``);
``sampling.schedulers.make_scheduler`` checks the same way, then builds the scheduler. A
diffusers scheduler's own config (with ``_class_name``, or the keys only diffusers writes)
passes as ``"diffusers"``: diffusers checks it when the scheduler is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffopt.util.validation import require_int

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
CONFIG_KEYS = {  # diffopt's own scheduler config
    "kind",
    "num_train_timesteps",
    "beta_schedule",
    "prediction_type",
    "clip_sample",
    "clip_sample_range",
    "timestep_scale",
}
MAX_TRAIN_TIMESTEPS = 100_000  # a schedule's training steps (1000 in practice); beyond: a typo, and minutes of work
DIFFUSERS_CONFIG_MARKERS = {"_use_default_values", "_diffusers_version"}  # keys only a diffusers config carries


def check_scheduler_config(config: Any) -> str:
    """The kind of ``config`` (``"ddpm"``, ``"flow"`` or ``"diffusers"``); a ``ValueError``
    (``TypeError`` for a non-mapping) names what is wrong."""
    if not isinstance(config, Mapping):
        raise TypeError(
            f"make_scheduler: config must be a mapping (a model's scheduler config) or a diffusers scheduler, "
            f"found {config!r:.80}"
        )
    unknown = sorted(set(config) - CONFIG_KEYS)
    if "_class_name" in config or (unknown and DIFFUSERS_CONFIG_MARKERS & set(config)):
        return "diffusers"
    if unknown:  # never silently read as another scheduler
        raise ValueError(
            f"make_scheduler: config has keys {unknown} that diffopt's scheduler config does not have (its keys: "
            f"{sorted(CONFIG_KEYS)}); for a diffusers scheduler pass the object or its saved config (with _class_name)"
        )
    kind = config.get("kind", "ddpm")
    if kind == "flow":
        return kind
    if kind != "ddpm":
        raise ValueError(f"unknown scheduler config kind {kind!r}: expected 'ddpm' or 'flow'")
    num_train_timesteps = config.get("num_train_timesteps", 1000)
    require_int("make_scheduler: config", "num_train_timesteps", num_train_timesteps, minimum=2)
    if num_train_timesteps > MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"make_scheduler: config.num_train_timesteps {num_train_timesteps} is above {MAX_TRAIN_TIMESTEPS}: "
            f"not a noise schedule diffusion models are trained with"
        )
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}: expected one of {BETA_SCHEDULES}")
    return kind
