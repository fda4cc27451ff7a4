"""Forecast caching: extrapolate module or block outputs in time instead of reusing them.

A preset of ``passes.caching``: a ``modules`` or ``span`` target, a ``periodic`` policy and
the ``newton`` predictor (``CachePass`` combines any target, policy and predictor).

Before: every step computes the chosen targets. After: two variants.
- ``full`` computes them and updates, per target, the Newton divided differences of
  its value over the timesteps of the last ``order + 1`` full steps:
  ``f[t0]``, ``f[t0, t1]``, ..., ``f[t0 .. t_order]`` (``t0`` the newest).
- ``forecast`` evaluates the interpolating polynomial through those points at the
  current timestep, ``y(t) = f[t0] + (t - t0) (f[t0, t1] + (t - t1) (f[t0, t1, t2] + ...))``,
  in place of the target, so the target's work (and everything that only fed it) is
  gone from that graph.

Targets (``targets=``):
- ``"modules"``: each selected block's attention and feed-forward submodules (class
  names with ``Attention``, ``FeedForward`` or ``MLP``), or the modules named by
  ``modules=`` (regular expressions, full match). Their outputs are forecast; the
  block's gates, norms and residual adds stay live.
- ``"blocks"``: block residuals ``out - in``; consecutive selected blocks form one span
  whose summed residual is forecast as one value (forecasting is linear, so this equals
  forecasting each block's residual, at a fraction of the elementwise work).

Time is the program's timestep input (its second input), so the forecast follows the
sampler's real grid, uneven spacing included. Until ``order + 1`` full steps have run,
the polynomial uses the points there are (one point: plain reuse). The schedule is
periodic with ``warmup`` leading full steps (``Schedule.warmup``); any other plan can be
set afterwards with ``OptimizedDenoiser.with_schedule``.

What is TaylorSeer's and what is not: TaylorSeer (Liu et al. 2025) forecasts the same
module outputs with a Taylor series whose derivatives are backward finite differences
over the step index. For ``order=1`` on a uniform grid that is exactly this forecast. For
``order >= 2`` TaylorSeer's series is not the interpolating polynomial (its second
difference is centred one interval back); Newton's form is, so it is exact for features
that are polynomials of degree ``order`` in ``t``. TaylorSeer's own form (diffusers' hook,
on its plan) is ``CachePass(predictor="taylorseer", policy="taylorseer")``. FoCa (Zheng et al. 2025) views the
feature sequence as an ODE: it predicts recursively from the last two values, forecasts
included (BDF2), and corrects with the derivative at the last full step (Heun). Its
authors' code is not published; cache-dit implements it as a calibrator, and
``benchmarks/configs/forecast_correctors_dit-digits.json`` compares it with TaylorSeer
on the same cache schedule (``benchmarks/results/forecast_correctors_dit-digits.md``): on
dit-digits FoCa reached 36.2 dB against TaylorSeer's 43.7 (order 1) and 47.3 (order 2)
at the same MACs, so no corrector is implemented here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffopt.ir.layers import require_chain
from diffopt.ir.program import StepProgram
from diffopt.passes.base import PassContext, PassKind, VariantPass, register_pass
from diffopt.passes.caching.policies import Periodic
from diffopt.passes.caching.predictors import Newton
from diffopt.passes.caching.rewrite import cache_rewrite
from diffopt.passes.caching.targets import Modules, Span
from diffopt.util.validation import block_names, chain_names, require_int

MAX_ORDER = 4  # highest forecast order accepted (see ForecastCachePass.__post_init__)
TARGET_KINDS = ("modules", "blocks")


@register_pass
@dataclass(frozen=True)
class ForecastCachePass(VariantPass):
    kind: ClassVar[str] = PassKind.CACHE
    after: ClassVar[tuple[str, ...]] = (PassKind.TEMPORAL_DIFFERENCE,)

    order: int = 1  # degree of the forecast polynomial; 0 is plain reuse
    period: int = 3  # a full step every `period` steps after the warm-up
    warmup: int = 1  # leading full steps
    targets: str = "modules"  # "modules" or "blocks"
    blocks: tuple[str, ...] | None = None  # which blocks of the chain; None: all
    modules: tuple[str, ...] | None = None  # targets="modules": regular expressions naming the modules
    container: str | tuple[str, ...] | None = None  # the chain(s) of blocks, see block_chain; None: the only one

    def __post_init__(self) -> None:
        object.__setattr__(self, "container", chain_names(self.name, self.container))
        require_int(self.name, "order", self.order, minimum=0)
        if self.order > MAX_ORDER:
            raise ValueError(
                f"{self.name}.order must be at most {MAX_ORDER}, found {self.order}: a polynomial through "
                f"{self.order + 1} full steps {self.period} steps apart is fitted only after "
                f"{self.warmup + self.order * self.period} steps, and extrapolating it amplifies each point's error "
                f"about 2^order-fold (TaylorSeer and diffusers' hook use order 1 or 2)"
            )
        require_int(self.name, "period", self.period, minimum=1)
        require_int(self.name, "warmup", self.warmup, minimum=1)
        if self.targets not in TARGET_KINDS:
            raise ValueError(f"{self.name}.targets must be one of {TARGET_KINDS}, found {self.targets!r}")
        if self.modules is not None and self.targets != "modules":
            raise ValueError(f"{self.name}.modules names modules to forecast: it needs targets='modules'")
        object.__setattr__(self, "blocks", block_names(self.name, self.blocks))
        if self.modules is not None:
            object.__setattr__(self, "modules", block_names(self.name, self.modules, field="modules"))
            for pattern in self.modules:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{self.name}.modules: {pattern!r} is not a regular expression: {error}") from None

    def check_model(self, model: torch.nn.Module) -> None:
        require_chain(model, self.container, self.name)

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
        """The preset: Newton's forecast of the targets, refreshed periodically."""
        parts = {"blocks": self.blocks, "container": self.container}
        target = Span(**parts) if self.targets == "blocks" else Modules(**parts, modules=self.modules)
        return cache_rewrite(program, self.name, target, Periodic(self.period, self.warmup), Newton(self.order))
