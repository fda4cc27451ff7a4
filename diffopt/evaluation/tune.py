"""``diffopt tune``: the cheapest configuration whose quality meets a floor, on a shipped model.

1. Every candidate (``bench.Configuration``: a pass list and a step count) samples
   ``samples`` digits from calibration noise; its quality is the PSNR against the
   unmodified model's 50-step samples from the same noise, its cost the MACs counted
   during that run (``cost="macs"``) or, for the candidates that meet the floor, the
   median wall time of interleaved runs on this machine (``cost="time"``).
2. The candidates that meet the floor, cheapest first, are validated on held-out noise
   (other seeds, ``validation_samples`` digits): the first that meets the floor there
   too is chosen. One that fails validation is reported and the next is tried.
3. The result lists every candidate, the Pareto set (cost vs PSNR) and the choice;
   ``measure.search.save`` writes it as JSON and PNG and the choice as a pass file
   (``diffopt.passes.registry.load_passes``), so deployment applies exactly that.

The search space, the Pareto set and the validated choice are ``measure.search``'s, shared
with the tuning of any diffusers pipeline (``diffopt.tune``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from diffopt.capture import capture
from diffopt.evaluation.bench import (
    REFERENCE_STEPS,
    Configuration,
    build,
    measure,
    reference_calibration,
    with_reference_steps,
)
from diffopt.evaluation.runs import time_runs
from diffopt.measure.search import check_floor, choose, pareto, search_space
from diffopt.models import example_inputs, load
from diffopt.passes.base import PassError

CALIBRATION_SEED = 0
VALIDATION_SEED = 1_000_000  # noise no calibration run draws


def default_candidates(graph) -> list[Configuration]:
    """``measure.search.search_space`` of the captured model at 50 steps, as bench configurations."""
    return [
        Configuration(c.name, c.passes, c.steps, family=c.family) for c in search_space(graph.module, REFERENCE_STEPS)
    ]


def tune(
    model_name: str,
    min_psnr: float,
    *,
    candidates: Sequence[Configuration] | None = None,
    cost: str = "macs",
    samples: int = 100,
    validation_samples: int = 200,
    timing_batch: int = 20,
    repeats: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Search ``candidates`` (default: ``default_candidates``) on ``model_name``; returns the
    summary (see the module docstring). Raises ``ValueError`` when nothing meets the floor."""
    check_floor(min_psnr, cost)
    model, config = load(model_name)
    graph = capture(model, example_inputs(model_name))
    candidates = (
        with_reference_steps(candidates, REFERENCE_STEPS) if candidates is not None else default_candidates(graph)
    )
    if not candidates:
        raise ValueError("no candidates to search")
    calibration = reference_calibration(graph, config) if any(c.needs_calibration for c in candidates) else None
    reference_row, reference = measure(
        model, config, REFERENCE_STEPS, samples, CALIBRATION_SEED, None, distribution=False
    )
    rows, skipped, denoisers = [], {}, {}
    for candidate in tqdm(candidates, desc=f"tune {model_name}", disable=not progress):
        try:
            denoisers[candidate.name] = build(candidate, model, graph, calibration, config)
        except (PassError, ValueError) as error:  # the pass does not fit this model
            skipped[candidate.name] = str(error)
            continue
        denoiser = denoisers[candidate.name]
        row, _ = measure(denoiser, config, candidate.steps, samples, CALIBRATION_SEED, reference, distribution=False)
        row["mac_fraction"] = row["macs_per_sample"] / reference_row["macs_per_sample"]
        rows.append({**candidate.to_dict(), **row})
    if not rows:
        raise ValueError(f"no candidate fits {model_name}: {skipped}")
    if cost == "time":
        feasible = [row for row in rows if row["psnr"] >= min_psnr]
        runners = {"reference": (model, REFERENCE_STEPS)}
        runners |= {r["name"]: (denoisers[r["name"]], r["steps"]) for r in feasible}
        times = time_runs(runners, config, timing_batch, repeats)
        for row in feasible:
            row["time_fraction"] = statistics.median(times[row["name"]]) / statistics.median(times["reference"])

    def validate(row: dict) -> bool:
        row["validation_psnr"] = _validate(model, config, row, denoisers, validation_samples)
        return row["validation_psnr"] >= min_psnr

    chosen, rejected = choose(rows, min_psnr, cost, validate, model_name)
    return {
        "model": model_name,
        "min_psnr": min_psnr,
        "cost": cost,
        "samples": samples,
        "validation_samples": validation_samples,
        "reference_steps": REFERENCE_STEPS,
        "scored_on": f"{samples} samples from calibration noise",
        "validated_on": f"{validation_samples} samples from held-out noise",
        "calibration_seed": CALIBRATION_SEED,
        "validation_seed": VALIDATION_SEED,
        "chosen": chosen,
        "failed_validation": rejected,
        "pareto": [row["name"] for row in pareto(rows)],  # MACs vs PSNR on the calibration noise
        "skipped": skipped,
        "rows": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _validate(model, config, row: dict, denoisers: dict, samples: int) -> float:
    """PSNR of a scored candidate against the 50-step model on held-out noise."""
    _, reference = measure(model, config, REFERENCE_STEPS, samples, VALIDATION_SEED, None, distribution=False)
    scored, _ = measure(denoisers[row["name"]], config, row["steps"], samples, VALIDATION_SEED, reference, False)
    return scored["psnr"]
