"""Step programs: a denoiser whose step k may depend on earlier steps, made explicit.

Every variant of a program is a plain graph with one signature::

    variant(latent, timestep, *conditions, *state) -> (out, *new_state)

``StateSpec`` describes the state tensors, ``Schedule`` picks the variant for step k
(``AdaptiveSchedule``: from a probe's signal at run time), and ``OptimizedDenoiser``
runs the program on a backend: functionally (``step``) or
like the original model (``__call__``, keeping the state itself).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import fx

from diffopt.capture import CapturedGraph, Signature

BATCH = "batch"  # marks the batch dimension in a StateEntry shape
FULL = "full"  # the name of the variant that computes the unmodified model
PROBE = "probe"  # the usual name of an AdaptiveSchedule's probe variant


class StateError(ValueError):
    """State tensors do not match the program's StateSpec (shape, dtype or count)."""


@dataclass(frozen=True)
class StateEntry:
    """One state tensor. ``shape`` holds ints and ``BATCH`` where the batch size goes."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype
    owner: str  # the pass that created it

    def shape_for(self, batch_size: int) -> tuple[int, ...]:
        return tuple(batch_size if d == BATCH else int(d) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "owner": self.owner}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StateEntry":
        return cls(data["name"], tuple(data["shape"]), getattr(torch, data["dtype"]), data["owner"])


@dataclass(frozen=True)
class StateSpec:
    """The ordered state a program threads from step to step. Initial values are zeros."""

    entries: tuple[StateEntry, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def with_entry(self, entry: StateEntry) -> "StateSpec":
        if entry.name in self.names:
            raise StateError(f"state entry {entry.name!r} already exists (owner {entry.owner!r})")
        return StateSpec((*self.entries, entry))

    def allocate(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(e.shape_for(batch_size), dtype=e.dtype, device=device) for e in self.entries)

    def check(self, state: Sequence[torch.Tensor], batch_size: int) -> None:
        """Raise ``StateError`` unless ``state`` matches this spec at ``batch_size``."""
        if len(state) != len(self.entries):
            raise StateError(f"expected {len(self.entries)} state tensors {list(self.names)}, found {len(state)}")
        for entry, tensor in zip(self.entries, state):
            expected = entry.shape_for(batch_size)
            if tuple(tensor.shape) != expected or tensor.dtype != entry.dtype:
                raise StateError(
                    f"state {entry.name!r}: expected shape {expected} dtype {entry.dtype} for batch size "
                    f"{batch_size}, found shape {tuple(tensor.shape)} dtype {tensor.dtype}. Start a new run "
                    f"(OptimizedDenoiser.reset() / init_state()) instead of reusing state from another batch.")

    def to_list(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.entries]


@dataclass(frozen=True)
class Schedule:
    """Which variant runs at step k.

    Step 0 always runs ``refresh``. With ``between=None`` every step does. Otherwise
    steps k > 0 run ``between``, except every ``period``-th step (k % period == 0),
    which refreshes; ``period=None`` refreshes only at step 0.
    """

    refresh: str = FULL
    between: str | None = None
    period: int | None = None

    def __post_init__(self) -> None:
        if self.period is not None and self.period < 1:
            raise ValueError(f"schedule period must be >= 1 or None, found {self.period}")

    def variant_at(self, step_index: int) -> str:
        if step_index < 0:
            raise ValueError(f"step index must be >= 0, found {step_index}")
        if self.between is None or step_index == 0:
            return self.refresh
        if self.period is not None and step_index % self.period == 0:
            return self.refresh
        return self.between

    @property
    def variants(self) -> tuple[str, ...]:
        return (self.refresh,) if self.between is None else (self.refresh, self.between)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "periodic", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class AdaptiveSchedule:
    """Which variant runs at step k, decided at run time by a probe.

    Every step first runs the ``probe`` variant,
    ``probe(latent, timestep, *conditions, *state) -> (signal, *new_state)``: a cheap cut
    of the model that measures (as one scalar for the whole batch) how far this step has
    moved from the last refresh. Step 0, and every step whose signal exceeds
    ``threshold`` or is not finite, then runs ``refresh``; the others run ``between``.
    The chosen variant gets the probe's new state, so work the probe did is not repeated.
    """

    probe: str
    threshold: float
    refresh: str = FULL
    between: str = "cached"

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"adaptive schedule threshold must be >= 0, found {self.threshold}")

    def choose(self, step_index: int, signal: float) -> str:
        if step_index == 0 or not math.isfinite(signal) or signal > self.threshold:
            return self.refresh
        return self.between

    @property
    def variants(self) -> tuple[str, ...]:
        return (self.probe, self.refresh, self.between)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", **dataclasses.asdict(self)}


def schedule_from_dict(data: Mapping[str, Any]) -> Schedule | AdaptiveSchedule:
    """Inverse of ``Schedule.to_dict`` / ``AdaptiveSchedule.to_dict``."""
    fields = {key: value for key, value in data.items() if key != "kind"}
    if data.get("kind") == "adaptive":
        return AdaptiveSchedule(**fields)
    if data.get("kind") == "periodic":
        return Schedule(**fields)
    raise ValueError(f"unknown schedule kind {data.get('kind')!r}: expected 'periodic' or 'adaptive'")


@dataclass
class StepProgram:
    """Variants (name -> graph) sharing one signature, the state they thread, and a schedule."""

    signature: Signature
    variants: dict[str, fx.GraphModule]
    state: StateSpec = field(default_factory=StateSpec)
    schedule: Schedule | AdaptiveSchedule = field(default_factory=Schedule)
    model_class: str = ""

    @classmethod
    def from_captured(cls, captured: CapturedGraph) -> "StepProgram":
        """The identity program: one ``full`` variant, no state."""
        program = cls(captured.signature, {FULL: captured.module}, model_class=captured.model_class)
        return program.copy()

    def copy(self) -> "StepProgram":
        """New graphs (so passes may edit them), same weight tensors."""
        variants = {name: fx.GraphModule(gm, copy.deepcopy(gm.graph)) for name, gm in self.variants.items()}
        return dataclasses.replace(self, variants=variants)

    @property
    def num_inputs(self) -> int:
        return len(self.signature.input_names)

    def fingerprint(self) -> str:
        """Text that changes whenever the program's structure does (used to check ``modified``)."""
        parts = [repr(self.state), repr(self.schedule)]
        for name in sorted(self.variants):
            graph = self.variants[name].graph
            parts.append(name)
            parts.extend(f"{n.format_node()} {n.meta.get('diffopt')!r}" for n in graph.nodes)
        return "\n".join(parts)
