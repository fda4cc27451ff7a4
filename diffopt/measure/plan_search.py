"""Refining a cache's refresh plan: which steps run in full, at a fixed number of them.

A fixed plan (``passes.caching.policies``) is a 0/1 mask over the run's steps; its cost is
the number of full steps, not where they are. Where they are matters as much as how many:
on dit-digits at a quarter of the MACs, moving the full steps of diffusers' TaylorSeer plan
(D5 i7) by one or two steps each gains 2.7 dB at the same MACs.

``refine_mask`` is a hill climb on that: each round tries moving each full step (all but
step 0, which the first forecast needs) one step earlier or later (``MOVES``) onto a cached
step, and keeps a move when ``quality(mask)`` (the caller's: PSNR of a short sampling run
against the plain model) rises by more than ``min_gain``. It stops after a round with no
kept move, or after ``rounds``. The count of full steps never changes, so neither does the
cost; the caller validates the result on held-out inputs (quality is measured on the noise
the climb saw). ``refined_candidate`` does it for a scored tune candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tqdm import tqdm

from diffopt.ir.specs import FULL
from diffopt.measure.workload import Configuration
from diffopt.passes.cache import CachePass
from diffopt.passes.caching.policies import Periodic, Policy, StepMask, TaylorSeerPlan
from diffopt.passes.registry import pass_from_dict

MOVES = (-1, 1)


def plan_mask(policy: Policy, steps: int) -> tuple[int, ...]:
    """``policy``'s plan over ``steps`` steps as a mask: 1 where the target runs in full."""
    schedule = policy.schedule("cached")
    return tuple(int(schedule.variant_at(step) == FULL) for step in range(steps))


def refine_mask(
    mask: Sequence[int],
    quality: Callable[[tuple[int, ...]], float],
    *,
    moves: Sequence[int] = MOVES,
    rounds: int = 2,
    min_gain: float = 0.02,
    progress: bool = False,
) -> tuple[tuple[int, ...], float, int]:
    """The best mask the climb reaches from ``mask`` (see the module docstring), its
    quality, and how many masks it measured (``mask`` included)."""
    mask = tuple(int(flag) for flag in mask)
    if not mask or mask[0] != 1 or set(mask) - {0, 1}:
        raise ValueError(f"refine_mask(): mask is 0/1 flags starting with 1, found {mask!r:.80}")
    best, measured = quality(mask), 1
    bar = tqdm(desc="plan search", unit="plan", disable=not progress)
    for _ in range(rounds):
        kept = False
        for step in range(1, len(mask)):
            for move in moves:
                to = step + move
                if not mask[step] or not 0 < to < len(mask) or mask[to]:
                    continue
                trial = list(mask)
                trial[step], trial[to] = 0, 1
                value = quality(tuple(trial))
                measured += 1
                bar.update()
                if value > best + min_gain:
                    mask, best, kept = tuple(trial), value, True
                    bar.set_postfix(psnr=f"{best:.2f}")
        if not kept:
            break
    bar.close()
    return mask, best, measured


def fixed_plan_cache(row: dict) -> CachePass | None:
    """The ``CachePass`` that is ``row``'s whole pass list, when its policy is a fixed plan
    (an adaptive or step-count candidate has no mask to move or fit for); else None."""
    if len(row["passes"]) != 1 or row["passes"][0].get("pass") != "CachePass":
        return None
    cache = pass_from_dict(row["passes"][0])
    return cache if isinstance(cache.policy, (Periodic, TaylorSeerPlan, StepMask)) else None


def refined_candidate(
    row: dict, quality: Callable[[Configuration], float], progress: bool = False
) -> tuple[Configuration, int] | None:
    """``row`` (a scored candidate: ``name``, ``passes``, ``steps``, ``family``) with its
    cache's plan refined by ``refine_mask``, ``quality(candidate)`` measuring each plan tried,
    and how many plans were measured; None when ``row`` is not one ``CachePass`` with a
    fixed plan (an adaptive or step-count candidate has no mask to move)."""
    cache = fixed_plan_cache(row)
    if cache is None:
        return None

    def candidate(mask: tuple[int, ...]) -> Configuration:
        item = {**row["passes"][0], "policy": StepMask(steps=mask).to_dict()}
        plan = "".join(map(str, mask))
        return Configuration(f"{row['name']}, plan {plan}", (item,), row["steps"], family=row["family"])

    start = plan_mask(cache.policy, row["steps"])
    mask, _, measured = refine_mask(start, lambda mask: quality(candidate(mask)), progress=progress)
    return candidate(mask), measured
