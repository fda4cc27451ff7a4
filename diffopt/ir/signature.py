"""What a captured denoiser's inputs are, and how its outputs are normalised.

``Signature`` names the latent, the timestep and the conditions of
``step(latent, timestep, *conditions)``; ``CapturedGraph`` is the graph capture produced;
``first_tensor_output`` turns any denoiser output (tensor, tuple, dict, dataclass) into
one tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

WRAPPED_MODEL_ATTRIBUTE = "model"


@dataclass(frozen=True)
class Signature:
    """Which model input is which: ``step(latent, timestep, *conditions)``."""

    latent: str
    timestep: str
    conditions: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return (self.latent, self.timestep, *self.conditions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        names = [data["latent"], data["timestep"], *data["conditions"]]
        if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
            raise ValueError(f"input names must be distinct strings, found {names}")
        return cls(data["latent"], data["timestep"], tuple(data["conditions"]))


@dataclass
class CapturedGraph:
    """A captured denoiser: ``module(latent, timestep, *conditions) -> (out,)``."""

    module: fx.GraphModule
    signature: Signature
    model_class: str


def first_tensor_output(output: Any) -> torch.Tensor:
    """Normalise a denoiser's output (tensor, tuple, dict, ModelOutput, dataclass) to a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "sample" in output:
            return first_tensor_output(output["sample"])
        return first_tensor_output(next(iter(output.values())))
    if dataclasses.is_dataclass(output):
        return first_tensor_output(getattr(output, dataclasses.fields(output)[0].name))
    if isinstance(output, (tuple, list)) and output:
        return first_tensor_output(output[0])
    raise TypeError(
        f"expected the denoiser to return a tensor (or a tuple/dict/dataclass holding one), "
        f"found {type(output).__name__}"
    )
