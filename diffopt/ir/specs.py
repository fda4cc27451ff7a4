"""What a step program's graphs take and thread: tensor specs (``"batch"`` marks the batch
dimension), the state entries a pass adds (``StateEntry``, ``StateSpec``), and the roles
that name variants (registered names, ``register_role``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from diffopt.util.validation import register_word

BATCH = "batch"  # marks the batch dimension in a StateEntry shape


Role = str  # a variant role is its name: variants are named by plain strings, one type
ROLES: set[str] = set()  # the registered roles; a plugin's pass registers its own


def register_role(name: str) -> str:
    """Register the variant role ``name`` (a lowercase word, ``-`` allowed) and return it."""
    return register_word(ROLES, name, "a variant role")


# What a variant does for the pass that made it; a variant's name is its roles joined by ``+`` in
# pass order (``cached+delta``), the refresh role of a later pass adding nothing.
FULL = register_role("full")  # computes the unmodified model (and, after passes, refreshes their state)
PROBE = register_role("probe")  # computes an AdaptiveSchedule's signal
CACHED = register_role("cached")  # reuses cached block outputs
CALIBRATED = register_role("calibrated")  # cached linear outputs corrected by a low-rank increment
DELTA = register_role("delta")  # temporal-difference linear layers
FORECAST = register_role("forecast")  # block or layer outputs extrapolated from earlier full steps


def combined_name(variant: str, role: str, refresh: str) -> str:
    """The name of ``variant`` rewritten by a later pass into ``role``: the later pass's
    refresh role keeps the name, ``full`` becomes the role, others get ``+role``."""
    if role == refresh:
        return str(variant)
    return str(role) if variant == FULL else f"{variant}+{role}"


def _checked_shape(shape: Any) -> tuple[int | str, ...]:
    """``shape`` as a tuple of non-negative ints and ``BATCH``; ``ValueError`` otherwise."""
    if not isinstance(shape, (list, tuple)) or not all(
        d == BATCH or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape
    ):
        raise ValueError(f"a shape is a list of non-negative ints and {BATCH!r}, found {shape!r}")
    return tuple(shape)


def concrete_shape(shape: Sequence[int | str], batch_size: int) -> tuple[int, ...]:
    """A shape with ``BATCH`` marking the batch dimension, at ``batch_size``."""
    return tuple(batch_size if d == BATCH else int(d) for d in shape)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: shape with ``"batch"`` where the batch size goes."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    bounds: tuple[int, int] | None = None  # the values an index input may take (class labels), inclusive

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return data if self.bounds is None else {**data, "bounds": list(self.bounds)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        bounds = data.get("bounds")
        if bounds is not None and not (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(type(b) is int for b in bounds)
            and bounds[0] <= bounds[1]
        ):
            raise ValueError(f"bounds must be [lowest, highest] ints, found {bounds!r}")
        spec = cls(str(data["name"]), _checked_shape(data["shape"]), str(data["dtype"]), _tuple_or_none(bounds))
        spec.torch_dtype  # noqa: B018 (raises on an unknown dtype)
        return spec

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}")
        return dtype

    @classmethod
    def of_node(cls, name: str, node: fx.Node) -> TensorSpec:
        """The spec of a graph value: its symbolic leading dimension becomes ``BATCH``."""
        value = node.meta["val"]
        dims = tuple(BATCH if isinstance(d, torch.SymInt) else int(d) for d in value.shape)
        return cls(name, dims, str(value.dtype).removeprefix("torch."))


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
        return concrete_shape(self.shape, batch_size)

    @property
    def spec(self) -> TensorSpec:
        """The entry as a graph input / output (what a bundle's variant files declare)."""
        return TensorSpec(self.name, self.shape, str(self.dtype).removeprefix("torch."))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StateEntry:
        spec = TensorSpec.from_dict(data)
        return cls(spec.name, spec.shape, spec.torch_dtype, str(data["owner"]))


@dataclass(frozen=True)
class StateSpec:
    """The ordered state a program threads from step to step. Initial values are zeros."""

    entries: tuple[StateEntry, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def with_entry(self, entry: StateEntry) -> StateSpec:
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
                    f"(OptimizedDenoiser.reset() / init_state()) instead of reusing state from another batch."
                )

    def to_list(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.entries]


def _tuple_or_none(value: list | None) -> tuple | None:
    return None if value is None else tuple(value)
