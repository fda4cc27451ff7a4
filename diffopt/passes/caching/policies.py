"""Refresh policies: when a cache target runs in full, lowered to ``ir.schedules`` data.

- ``periodic``: ``warmup`` full steps, then one full step every ``period`` (the first
  ``period - 1`` steps after the warm-up cached): ``Schedule(period, warmup)``;
- ``taylorseer``: diffusers' TaylorSeer plan: ``warmup`` (its ``disable_cache_before_step``)
  full steps, a cached step, then a full step every ``period`` (``cache_interval``)
  starting at ``warmup + 1``: ``Schedule(period, warmup, phase=1)``;
- ``mask``: an explicit plan, one flag per step (1 full, 0 cached): ``ListSchedule``; its
  length is the run's step count;
- ``error_gated`` (adaptive): every step first runs a probe, the model up to the block
  before the target (the gate), and forecasts the gate's own value with the cache's
  predictor; the target runs in full at step 0 and where ``mean|forecast - gate| /
  mean|gate|`` (``relative_to="forecast"``: ``/ mean|forecast|``) exceeds ``threshold``:
  ``AdaptiveSchedule`` (``passes.caching.rewrite`` builds the probe). With the ``reuse``
  predictor and ``relative_to="forecast"`` this is diffusers' FirstBlockCache.

The fixed ones lower to a fixed schedule, so export and the no-host-sync rule hold, and the
serving engine batches them; the adaptive one exports too (its probe's signal picks the
variant on the host, as the first-block cache's does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from diffopt.ir.schedules import AdaptiveSchedule, BaseSchedule, ListSchedule, Schedule
from diffopt.ir.specs import FULL, PROBE
from diffopt.util.validation import require_int, require_number

POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: ``cls`` can be named by its ``kind`` in a pass file."""
    POLICIES[cls.kind] = cls
    return cls


class Policy:
    """Base of the refresh policies: ``schedule(between)`` is the plan, ``between`` the
    variant of the steps that do not run in full; ``adaptive`` ones decide at run time from a
    probe variant the rewrite builds."""

    kind: ClassVar[str]
    adaptive: ClassVar[bool] = False

    def schedule(self, between: str) -> BaseSchedule:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@register_policy
@dataclass(frozen=True)
class Periodic(Policy):
    kind: ClassVar[str] = "periodic"
    period: int = 2
    warmup: int = 1

    def __post_init__(self) -> None:
        require_int("periodic policy", "period", self.period, minimum=1)
        require_int("periodic policy", "warmup", self.warmup, minimum=1)

    def schedule(self, between):
        return Schedule(FULL, between, self.period, self.warmup)


@register_policy
@dataclass(frozen=True)
class TaylorSeerPlan(Policy):
    kind: ClassVar[str] = "taylorseer"
    period: int = 5  # diffusers' cache_interval
    warmup: int = 3  # diffusers' disable_cache_before_step

    def __post_init__(self) -> None:
        require_int("taylorseer policy", "period", self.period, minimum=1)
        require_int("taylorseer policy", "warmup", self.warmup, minimum=1)

    def schedule(self, between):
        return Schedule(FULL, between, self.period, self.warmup, phase=1)


@register_policy
@dataclass(frozen=True)
class StepMask(Policy):
    kind: ClassVar[str] = "mask"
    steps: tuple[int, ...] = (1,)  # 1: full, 0: cached; step 0 must be full

    def __post_init__(self) -> None:
        steps = tuple(self.steps) if isinstance(self.steps, (list, tuple)) else None
        if not steps or any(flag not in (0, 1) or isinstance(flag, float) for flag in steps) or steps[0] != 1:
            raise ValueError(
                f"mask policy: steps is a list of 1 (full) and 0 (cached) starting with 1, found {self.steps!r:.80}"
            )
        object.__setattr__(self, "steps", tuple(int(flag) for flag in steps))

    def schedule(self, between):
        return ListSchedule(tuple(FULL if flag else between for flag in self.steps))


@register_policy
@dataclass(frozen=True)
class ErrorGated(Policy):
    kind: ClassVar[str] = "error_gated"
    adaptive: ClassVar[bool] = True
    threshold: float = 0.05
    relative_to: str = "value"  # the error's scale: the gate's value, or the forecast (diffusers' FirstBlockCache)

    def __post_init__(self) -> None:
        require_number("error_gated policy", "threshold", self.threshold, minimum=0.0)
        if self.relative_to not in ("value", "forecast"):
            raise ValueError(f"error_gated policy: relative_to is 'value' or 'forecast', found {self.relative_to!r}")

    def schedule(self, between):
        return AdaptiveSchedule(PROBE, float(self.threshold), refresh=FULL, between=between)
