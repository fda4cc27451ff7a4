"""``diffopt.tune(pipe, calls, min_psnr=...)``: the cheapest pass list for a diffusers
pipeline whose images stay within a PSNR floor of the unmodified pipeline's.

``calls`` are the user's pipeline call arguments, each with an integer ``seed`` that becomes
its generator; the held-out calls (``validation_calls``, by default the same calls with other
seeds) validate the choice. The search is ``measure.tuning.tune`` over the pipeline as a
``pipelines.workload.PipelineWorkload``: each candidate's quality is the PSNR of its outputs
against the plain pipeline's on the same calls, its cost the MACs it ran over the plain
pipeline's (or the wall time, ``cost="time"``); with ``metric``/``min_metric`` the choice
must also reach that metric on the held-out calls. With a ``budget`` instead of a floor, the
best held-out candidate within it is chosen and its cache plan refined on the calls.
``out=STEM`` writes ``STEM.json``, ``STEM.png`` and the pass file ``STEM.passes.json``.

Passes that need calibration statistics (ICC) are searched only when ``calibration`` is
given. The pipeline is left as it came (each candidate is enabled, run and disabled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from diffopt.ir.statistics import CalibrationStatistics
from diffopt.measure import tuning
from diffopt.measure.search import save
from diffopt.measure.workload import Configuration
from diffopt.pipelines.call_key import flatten_arguments
from diffopt.pipelines.workload import PipelineWorkload

VALIDATION_SEED_OFFSET = 1_000_000  # held-out calls: the same arguments, seeds no scored call uses


def tune(
    pipe: Any,
    calls: Sequence[Mapping[str, Any]],
    min_psnr: float | None = None,
    *,
    budget: float | None = None,
    cost: str = "macs",
    validation_calls: Sequence[Mapping[str, Any]] | None = None,
    candidates: Sequence[Configuration] | None = None,
    metric: tuning.Metric | None = None,
    min_metric: float | None = None,
    calibration: CalibrationStatistics | None = None,
    repeats: int = 3,
    out: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search pass lists for ``pipe`` (see the module docstring); returns the summary: every
    scored row, the Pareto set, the choice and what was skipped. Raises ``ValueError`` when
    no candidate meets ``min_psnr`` (and ``min_metric``) on the calls and held-out calls, or
    none fits the ``budget`` (a fraction of the reference's MACs)."""
    tuning.check_goal(min_psnr, budget, cost, metric, min_metric)
    workload = pipeline_workload(pipe, calls, validation_calls, calibration)
    with _progress_bars(pipe, progress):
        summary = tuning.tune(
            workload,
            min_psnr,
            budget=budget,
            cost=cost,
            candidates=candidates,
            metric=metric,
            min_metric=min_metric,
            repeats=repeats,
            progress=progress,
        )
    if out is not None:
        summary["pass_file"] = str(save(summary, out))
    return summary


def pipeline_workload(
    pipe: Any,
    calls: Sequence[Mapping[str, Any]],
    validation_calls: Sequence[Mapping[str, Any]] | None = None,
    calibration: CalibrationStatistics | None = None,
) -> PipelineWorkload:
    """``pipe`` with checked ``calls`` (and held-out calls: ``held_out_calls`` by default) as
    bench and tune run it; refused when diffopt is already enabled on it."""
    from diffopt.pipelines import _components

    if _components(pipe):
        raise ValueError(f"tune(): diffopt is enabled on {type(pipe).__name__}: pass the plain pipeline")
    calls = _checked_calls(calls, "calls", seeded=validation_calls is None)
    validation_calls = (
        held_out_calls(calls)
        if validation_calls is None
        else _checked_calls(validation_calls, "validation_calls", False)
    )
    return PipelineWorkload(pipe, calls, validation_calls, calibration)


def held_out_calls(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``calls`` with seeds no scored call uses: ``seed + VALIDATION_SEED_OFFSET`` (or more
    multiples of it, where that seed is itself scored or already taken)."""
    taken = {call["seed"] for call in calls}
    held_out = []
    for call in calls:
        seed = call["seed"] + VALIDATION_SEED_OFFSET
        while seed in taken:
            seed += VALIDATION_SEED_OFFSET
        taken.add(seed)
        held_out.append({**call, "seed": seed})
    return held_out


@contextlib.contextmanager
def _progress_bars(pipe: Any, shown: bool) -> Iterator[None]:
    """The pipeline's own progress bars hidden while ``shown`` is false (its settings restored after)."""
    if shown or not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = saved


def _checked_calls(calls: Any, name: str, seeded: bool) -> list[dict[str, Any]]:
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence) or not calls:
        raise ValueError(f"tune(): {name} is a non-empty list of pipeline call arguments (dicts), found {calls!r:.80}")
    checked = []
    for index, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise ValueError(f"tune(): {name}[{index}] is a dict of pipeline call arguments, found {call!r:.80}")
        seed = call.get("seed")
        if "generator" in call:
            raise ValueError(f"tune(): {name}[{index}] has a generator: give an integer 'seed' instead")
        if (seeded or seed is not None) and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(
                f"tune(): {name}[{index}] needs an integer 'seed' >= 0 (its noise; held-out calls use other seeds), "
                f"found {seed!r}"
            )
        for key, value in flatten_arguments(call).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"tune(): {name}[{index}].{key} holds NaN or infinite values: give finite tensors")
        checked.append(dict(call))
    return checked
