"""Step programs: a denoiser whose step k may depend on earlier steps, made explicit.

Every variant of a program is a plain graph with one signature::

    variant(latent, timestep, *conditions, *state) -> (out, *new_state)

``StateSpec`` describes the state tensors, ``Schedule`` picks the variant for step k
(``AdaptiveSchedule``: from a probe's signal at run time; ``ComposedSchedule``: two
schedules of composed passes at once), and ``OptimizedDenoiser`` runs the program on a
backend: functionally (``step``) or like the original model (``__call__``, keeping the
state itself).

Every schedule answers the same two questions for step k: ``probe_at(k)`` (the variant
to run first for a signal, or None) and ``variant_at(k, signal)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import fx

from diffopt.ir.signature import CapturedGraph, Signature

BATCH = "batch"  # marks the batch dimension in a StateEntry shape


class Role(str, Enum):
    """What a variant does for the pass that made it; a variant's name is its roles joined
    by ``+`` in pass order (``cached+delta``), the refresh role of a later pass adding nothing."""

    FULL = "full"  # computes the unmodified model (and, after passes, refreshes their state)
    PROBE = "probe"  # computes an AdaptiveSchedule's signal
    CACHED = "cached"  # reuses cached block outputs
    CALIBRATED = "calibrated"  # cached linear outputs corrected by a low-rank increment
    DELTA = "delta"  # temporal-difference linear layers

    def __str__(self) -> str:
        return self.value


FULL, PROBE, CACHED, CALIBRATED, DELTA = Role.FULL, Role.PROBE, Role.CACHED, Role.CALIBRATED, Role.DELTA


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


@dataclass(frozen=True)
class Schedule:
    """Which variant runs at step k.

    The first ``warmup`` steps (at least step 0) run ``refresh``. With ``between=None``
    every step does. Otherwise later steps run ``between``, except every ``period``-th
    step counted from the last warm-up step (k - warmup + 1 divisible by ``period``;
    with one warm-up step: k % period == 0), which refreshes; ``period=None`` refreshes
    only during the warm-up.
    """

    refresh: str = FULL
    between: str | None = None
    period: int | None = None
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.period is not None and (
            isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1
        ):
            raise ValueError(f"schedule period must be an int >= 1 or None, found {self.period!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"schedule warmup must be an int >= 1 (step 0 always refreshes), found {self.warmup!r}")

    def probe_at(self, step_index: int) -> None:
        return None

    def variant_at(self, step_index: int, signal: float | None = None) -> str:
        if not isinstance(step_index, int) or step_index < 0:
            raise ValueError(f"step index must be an int >= 0, found {step_index!r}")
        if self.between is None or step_index < self.warmup:
            return self.refresh
        if self.period is not None and (step_index - self.warmup + 1) % self.period == 0:
            return self.refresh
        return self.between

    @property
    def variants(self) -> tuple[str, ...]:
        return (self.refresh,) if self.between is None else (self.refresh, self.between)

    @property
    def probes(self) -> frozenset[str]:
        return frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "periodic",
            "refresh": str(self.refresh),
            "between": None if self.between is None else str(self.between),
            "period": self.period,
            **({"warmup": self.warmup} if self.warmup != 1 else {}),  # older manifests have no warmup
        }


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

    def probe_at(self, step_index: int) -> str:
        return self.probe

    def variant_at(self, step_index: int, signal: float | None = None) -> str:
        if signal is None:
            raise ValueError(f"an adaptive schedule needs the signal of its probe {self.probe!r} to pick a variant")
        if step_index == 0 or not math.isfinite(signal) or signal > self.threshold:
            return self.refresh
        return self.between

    @property
    def variants(self) -> tuple[str, ...]:
        return (self.probe, self.refresh, self.between)

    @property
    def probes(self) -> frozenset[str]:
        return frozenset({self.probe})

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "adaptive",
            "probe": str(self.probe),
            "threshold": self.threshold,
            "refresh": str(self.refresh),
            "between": str(self.between),
        }


@dataclass(frozen=True)
class ComposedSchedule:
    """The schedules of two composed passes at once.

    A pass that rewrites every variant of a program (``outer`` schedule) into its own
    variants (``inner``, a periodic schedule) makes one variant per pair; ``names`` maps
    each pair ``(outer variant, inner variant)`` to it. At step k the probe (if the
    outer schedule has one) and the variant are those of the pair of both choices.
    """

    outer: Schedule | AdaptiveSchedule | ComposedSchedule | ListSchedule
    inner: Schedule
    names: tuple[tuple[str, str, str], ...]  # (outer variant, inner variant, combined variant)

    def _combined(self, outer: str, inner: str) -> str:
        for outer_name, inner_name, combined in self.names:
            if outer_name == outer and inner_name == inner:
                return combined
        raise KeyError(f"the composed schedule has no variant for ({outer!r}, {inner!r})")

    def probe_at(self, step_index: int) -> str | None:
        probe = self.outer.probe_at(step_index)
        return None if probe is None else self._combined(probe, self.inner.variant_at(step_index))

    def variant_at(self, step_index: int, signal: float | None = None) -> str:
        return self._combined(self.outer.variant_at(step_index, signal), self.inner.variant_at(step_index))

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(combined for _, _, combined in self.names)

    @property
    def probes(self) -> frozenset[str]:
        return frozenset(combined for outer, _, combined in self.names if outer in self.outer.probes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "composed",
            "outer": self.outer.to_dict(),
            "inner": self.inner.to_dict(),
            "names": [list(map(str, triple)) for triple in self.names],
        }


@dataclass(frozen=True)
class ListSchedule:
    """A plan with one variant per step: step k runs ``steps[k]``; a one-entry plan runs its
    variant at every step (e.g. the depths of a length-shortcut program, shallow early and
    deep late). A step past the end of a longer plan is an error, never a silent repeat."""

    steps: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.steps, (str, bytes)) or not self.steps or not all(isinstance(s, str) for s in self.steps):
            raise ValueError(f"a list schedule needs a non-empty list of variant names, found {self.steps!r}")
        object.__setattr__(self, "steps", tuple(self.steps))

    def probe_at(self, step_index: int) -> None:
        return None

    def variant_at(self, step_index: int, signal: float | None = None) -> str:
        if not isinstance(step_index, int) or step_index < 0:
            raise ValueError(f"step index must be an int >= 0, found {step_index!r}")
        if len(self.steps) == 1:
            return self.steps[0]
        if step_index >= len(self.steps):
            raise ValueError(
                f"the schedule plans {len(self.steps)} steps ({list(self.steps)}); step {step_index} is past its end: "
                f"give it one variant per sampling step"
            )
        return self.steps[step_index]

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.steps))

    @property
    def probes(self) -> frozenset[str]:
        return frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "list", "steps": list(self.steps)}


AnySchedule = Schedule | AdaptiveSchedule | ComposedSchedule | ListSchedule
SCHEDULE_KINDS = ("periodic", "adaptive", "composed", "list")


def schedule_from_dict(data: Mapping[str, Any]) -> AnySchedule:
    """Inverse of the schedules' ``to_dict``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a schedule is a JSON object, found {type(data).__name__}")
    kind = data.get("kind")
    fields = {key: value for key, value in data.items() if key != "kind"}
    try:
        if kind == "adaptive":
            return AdaptiveSchedule(**fields)
        if kind == "periodic":
            return Schedule(**fields)
        if kind == "list":
            return ListSchedule(**fields)
        if kind == "composed":
            inner = schedule_from_dict(fields["inner"])
            if not isinstance(inner, Schedule):
                raise ValueError("the inner schedule of a composed schedule must be periodic")
            return ComposedSchedule(
                schedule_from_dict(fields["outer"]), inner, tuple(tuple(triple) for triple in fields["names"])
            )
    except (TypeError, KeyError) as error:
        raise ValueError(f"schedule {dict(data)!r} has missing or unknown fields: {error}") from error
    raise ValueError(f"unknown schedule kind {kind!r}: expected one of {SCHEDULE_KINDS}")


@dataclass(frozen=True)
class ProgramInterface:
    """What running a program needs, without its graphs: the signature with the model
    inputs' specs, the state it threads and its schedule (a bundle's manifest describes
    exactly this)."""

    signature: Signature
    inputs: tuple[TensorSpec, ...]  # (latent, timestep, *conditions)
    state: StateSpec
    schedule: AnySchedule
    model_class: str = ""
    device: torch.device = torch.device("cpu")  # where inputs and state go

    @property
    def num_inputs(self) -> int:
        return len(self.signature.input_names)


@dataclass
class StepProgram:
    """Variants (name -> graph) sharing one signature, the state they thread, and a schedule."""

    signature: Signature
    variants: dict[str, fx.GraphModule]
    state: StateSpec = field(default_factory=StateSpec)
    schedule: AnySchedule = field(default_factory=Schedule)
    model_class: str = ""
    applied: tuple[tuple[str, str], ...] = ()  # (kind, pass) of every variant-creating pass, in order
    input_specs: tuple[TensorSpec, ...] | None = None  # set by placement; None: read from the graphs
    device: torch.device = torch.device("cpu")  # where the weights are (ir.placement.place moves them)

    @classmethod
    def from_captured(cls, captured: CapturedGraph) -> StepProgram:
        """The identity program: one ``full`` variant, no state."""
        program = cls(captured.signature, {FULL: captured.module}, model_class=captured.model_class)
        return program.copy()

    def copy(self) -> StepProgram:
        """New graphs (so passes may edit them), same weight tensors."""
        variants = {name: fx.GraphModule(gm, copy.deepcopy(gm.graph)) for name, gm in self.variants.items()}
        return dataclasses.replace(self, variants=variants)

    @property
    def num_inputs(self) -> int:
        return len(self.signature.input_names)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model inputs ``(latent, timestep, *conditions)``, from the graphs."""
        if self.input_specs is not None:
            return self.input_specs
        module = next(iter(self.variants.values()))
        placeholders = [node for node in module.graph.nodes if node.op == "placeholder"][: self.num_inputs]
        return tuple(
            dataclasses.replace(TensorSpec.of_node(name, node), bounds=_index_bounds(module, node))
            for name, node in zip(self.signature.input_names, placeholders)
        )

    @property
    def interface(self) -> ProgramInterface:
        return ProgramInterface(self.signature, self.inputs, self.state, self.schedule, self.model_class, self.device)

    def fingerprint(self) -> str:
        """Text that changes whenever the program's structure does (used to check ``modified``)."""
        parts = [repr(self.state), repr(self.schedule), repr(self.applied)]
        for name in sorted(self.variants):
            graph = self.variants[name].graph
            parts.append(name)
            parts.extend(f"{n.format_node()} {n.meta.get('diffopt')!r}" for n in graph.nodes)
        return "\n".join(parts)


def _attribute(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part, None)
    return module


def _tuple_or_none(value: list | None) -> tuple | None:
    return None if value is None else tuple(value)


_INDEX_PASS_THROUGH = {  # ops an index input may pass through on its way to an embedding table
    torch.ops.aten._to_copy.default,
    torch.ops.aten.to.dtype,
    torch.ops.aten.clone.default,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.flatten.using_ints,
}


def _index_bounds(module: fx.GraphModule, placeholder: fx.Node) -> tuple[int, int] | None:
    """``(0, rows - 1)`` for an integer input that indexes embedding tables (class labels: an
    index past the table is an error in torch and silently something else in onnxruntime);
    None for any other input."""
    value = placeholder.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
        return None
    rows, frontier = [], [placeholder]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.op != "call_function":
                continue
            if user.target == torch.ops.aten.embedding.default and user.args[1] is node:
                weight = user.args[0]
                table = _attribute(module, weight.target) if weight.op == "get_attr" else weight.meta.get("val")
                if isinstance(table, torch.Tensor):
                    rows.append(int(table.shape[0]))
            elif user.target in _INDEX_PASS_THROUGH and user.args[0] is node:
                frontier.append(user)
    return (0, min(rows) - 1) if rows else None
