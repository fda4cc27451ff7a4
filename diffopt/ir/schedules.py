"""Schedules: which variant of a step program runs at step k.

``Schedule`` (periodic refresh), ``AdaptiveSchedule`` (from a probe's signal at run time),
``ComposedSchedule`` (two composed passes' schedules at once) and ``ListSchedule`` (one
variant per step), all ``BaseSchedule``s: every one answers ``probe_at(k)`` (the variant to
run first for a signal, or None) and ``variant_at(k, signal)``, and ``schedule_from_dict``
reads what ``to_dict`` wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from diffopt.ir.specs import CACHED, FULL


class BaseSchedule:
    """What every schedule answers for step k: ``probe_at(k)`` (the variant to run first for a
    signal, or None) and ``variant_at(k, signal)``; ``variants`` and ``probes`` list what it
    uses, ``to_dict`` / ``schedule_from_dict`` write and read it (``kind`` tells them apart)."""

    kind: ClassVar[str]

    def probe_at(self, step_index: int) -> str | None:
        return None

    def variant_at(self, step_index: int, signal: float | None = None) -> str:
        raise NotImplementedError

    @property
    def variants(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def probes(self) -> frozenset[str]:
        return frozenset()

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> BaseSchedule:
        """The schedule of ``to_dict``'s fields (without ``kind``)."""
        return cls(**fields)


def _checked_step(step_index: Any) -> None:
    if not isinstance(step_index, int) or step_index < 0:
        raise ValueError(f"step index must be an int >= 0, found {step_index!r}")


@dataclass(frozen=True)
class Schedule(BaseSchedule):
    """Which variant runs at step k.

    The first ``warmup`` steps (at least step 0) run ``refresh``. With ``between=None``
    every step does. Otherwise later steps run ``between``, except every ``period``-th
    step counted from the last warm-up step (k - warmup + 1 divisible by ``period``;
    with one warm-up step: k % period == 0), which refreshes; ``period=None`` refreshes
    only during the warm-up. ``phase`` moves that count: with ``phase=1`` the refreshes
    are at ``warmup + 1``, ``warmup + 1 + period``, ... (k - warmup - 1 divisible by
    ``period``: diffusers' TaylorSeer plan, whose step ``warmup`` is already forecast).
    """

    kind: ClassVar[str] = "periodic"
    refresh: str = FULL
    between: str | None = None
    period: int | None = None
    warmup: int = 1
    phase: int = -1

    def __post_init__(self) -> None:
        if self.period is not None and (
            isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1
        ):
            raise ValueError(f"schedule period must be an int >= 1 or None, found {self.period!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"schedule warmup must be an int >= 1 (step 0 always refreshes), found {self.warmup!r}")
        if isinstance(self.phase, bool) or not isinstance(self.phase, int):
            raise ValueError(f"schedule phase must be an int, found {self.phase!r}")

    def variant_at(self, step_index: int, signal: float | None = None) -> str:
        _checked_step(step_index)
        if self.between is None or step_index < self.warmup:
            return self.refresh
        if self.period is not None and (step_index - self.warmup - self.phase) % self.period == 0:
            return self.refresh
        return self.between

    @property
    def variants(self) -> tuple[str, ...]:
        return (self.refresh,) if self.between is None else (self.refresh, self.between)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "periodic",
            "refresh": str(self.refresh),
            "between": None if self.between is None else str(self.between),
            "period": self.period,
            **({"warmup": self.warmup} if self.warmup != 1 else {}),  # older manifests have no warmup
            **({"phase": self.phase} if self.phase != -1 else {}),  # nor a phase
        }


@dataclass(frozen=True)
class AdaptiveSchedule(BaseSchedule):
    """Which variant runs at step k, decided at run time by a probe.

    Every step first runs the ``probe`` variant,
    ``probe(latent, timestep, *conditions, *state) -> (signal, *new_state)``: a cheap cut
    of the model that measures (as one scalar for the whole batch) how far this step has
    moved from the last refresh. Step 0, and every step whose signal exceeds
    ``threshold`` or is not finite, then runs ``refresh``; the others run ``between``.
    The chosen variant gets the probe's new state, so work the probe did is not repeated.
    """

    kind: ClassVar[str] = "adaptive"
    probe: str
    threshold: float
    refresh: str = FULL
    between: str = CACHED

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
class ComposedSchedule(BaseSchedule):
    """The schedules of two composed passes at once.

    A pass that rewrites every variant of a program (``outer`` schedule) into its own
    variants (``inner``, a periodic schedule) makes one variant per pair; ``names`` maps
    each pair ``(outer variant, inner variant)`` to it. At step k the probe (if the
    outer schedule has one) and the variant are those of the pair of both choices.
    """

    kind: ClassVar[str] = "composed"
    outer: BaseSchedule
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

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> ComposedSchedule:
        inner = schedule_from_dict(fields["inner"])
        if not isinstance(inner, Schedule):
            raise ValueError("the inner schedule of a composed schedule must be periodic")
        return cls(schedule_from_dict(fields["outer"]), inner, tuple(tuple(triple) for triple in fields["names"]))


@dataclass(frozen=True)
class ListSchedule(BaseSchedule):
    """A plan with one variant per step: step k runs ``steps[k]``; a one-entry plan runs its
    variant at every step (e.g. the depths of a length-shortcut program, shallow early and
    deep late). A step past the end of a longer plan is an error, never a silent repeat."""

    kind: ClassVar[str] = "list"
    steps: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.steps, (str, bytes)) or not self.steps or not all(isinstance(s, str) for s in self.steps):
            raise ValueError(f"a list schedule needs a non-empty list of variant names, found {self.steps!r}")
        object.__setattr__(self, "steps", tuple(self.steps))

    def variant_at(self, step_index: int, signal: float | None = None) -> str:
        _checked_step(step_index)
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

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "list", "steps": list(self.steps)}


SCHEDULE_TYPES: dict[str, type[BaseSchedule]] = {
    cls.kind: cls for cls in (Schedule, AdaptiveSchedule, ComposedSchedule, ListSchedule)
}


def schedule_from_dict(data: Mapping[str, Any]) -> BaseSchedule:
    """Inverse of the schedules' ``to_dict``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a schedule is a JSON object, found {type(data).__name__}")
    kind = data.get("kind")
    if kind not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule kind {kind!r}: expected one of {tuple(SCHEDULE_TYPES)}")
    try:
        return SCHEDULE_TYPES[kind].from_fields({key: value for key, value in data.items() if key != "kind"})
    except (TypeError, KeyError) as error:
        raise ValueError(f"schedule {dict(data)!r} has missing or unknown fields: {error}") from error
