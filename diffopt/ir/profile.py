"""Defo's per-layer cost profile: what ``measure.defo_profile`` measured, what ``DefoPass`` reads.

Per layer group (layers that read one input share one difference), the cost of its ops
in full form and of its delta nodes, measured on a backend and modelled by a
``MachineModel`` (per-op overhead, memory bandwidth, MAC rate per dtype). Plain data,
saved as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffopt.util.files import read_json, write_text


@dataclass(frozen=True)
class MachineModel:
    """Per-op overhead (s), memory bandwidth (bytes/s) and MAC rate per dtype (MACs/s)."""

    overhead_s: float
    bytes_per_s: float
    macs_per_s: dict[str, float]


@dataclass
class GroupCost:
    layers: list[str]
    full_measured_s: float
    delta_measured_s: float
    full_model_s: float
    delta_model_s: float

    def delta_wins(self, cost: str) -> bool:
        return getattr(self, f"delta_{cost}_s") < getattr(self, f"full_{cost}_s")


@dataclass
class LayerProfile:
    """Per layer group: the cost of its ops in full form and of its delta nodes, measured and modelled."""

    difference: dict[str, Any]  # the TemporalDifferencePass options profiled
    batch_size: int
    step_index: int
    machine: MachineModel
    groups: dict[str, GroupCost] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LayerProfile:
        data = read_json(path, "a layer profile")
        return cls(
            data["difference"],
            data["batch_size"],
            data["step_index"],
            MachineModel(**data["machine"]),
            {name: GroupCost(**group) for name, group in data["groups"].items()},
        )

    def agreement(self) -> float:
        """Fraction of layers where the cost model decides as the measurement does."""
        weights = [(len(g.layers), g.delta_wins("model") == g.delta_wins("measured")) for g in self.groups.values()]
        return sum(n for n, agree in weights if agree) / max(sum(n for n, _ in weights), 1)
