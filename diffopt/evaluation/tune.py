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
from dataclasses import dataclass, field
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
from diffopt.measure.search import check_floor, choose, choose_within_budget, pareto, search_space
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
    min_psnr: float | None = None,
    *,
    budget: float | None = None,
    candidates: Sequence[Configuration] | None = None,
    cost: str = "macs",
    samples: int = 100,
    validation_samples: int = 200,
    timing_batch: int = 20,
    repeats: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Search ``candidates`` (default: ``default_candidates``) on ``model_name``; returns the
    summary (see the module docstring). With ``min_psnr``: the cheapest candidate over that
    floor on held-out noise (``ValueError`` when none is); with ``budget`` (a fraction of the
    reference's cost) instead: the best on held-out noise of the best-scoring candidates that
    cost at most that."""
    if (min_psnr is None) == (budget is None):
        raise ValueError("tune(): give exactly one of min_psnr= (a quality floor) or budget= (a cost ceiling)")
    if budget is not None and cost != "macs":
        raise ValueError("tune(): a budget is a fraction of the reference's MACs: use cost='macs' with it")
    check_floor(min_psnr if budget is None else 1.0, cost)
    scored = score(model_name, candidates, samples, progress)
    model, config, rows, denoisers, skipped = scored.model, scored.config, scored.rows, scored.denoisers, scored.skipped
    if cost == "time":
        feasible = [row for row in rows if row["psnr"] >= min_psnr]
        runners = {"reference": (model, REFERENCE_STEPS)}
        runners |= {r["name"]: (denoisers[r["name"]], r["steps"]) for r in feasible}
        times = time_runs(runners, config, timing_batch, repeats)
        for row in feasible:
            row["time_fraction"] = statistics.median(times[row["name"]]) / statistics.median(times["reference"])

    def held_out_psnr(row: dict) -> float:
        return scored.validate(row, validation_samples)

    if budget is None:
        chosen, rejected = choose(rows, min_psnr, cost, lambda row: held_out_psnr(row) >= min_psnr, model_name)
    else:
        chosen, rejected = choose_within_budget(rows, budget, cost, held_out_psnr, model_name)
    return {
        "model": model_name,
        "min_psnr": min_psnr,
        "budget": budget,
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


@dataclass
class Scored:
    """Every candidate scored on one model: its rows (PSNR and MAC fraction on the calibration
    noise), the denoisers built for them, and what was skipped and why."""

    model: torch.nn.Module
    config: dict
    rows: list[dict]
    denoisers: dict[str, Any]
    skipped: dict[str, str]
    _references: dict[int, torch.Tensor] = field(default_factory=dict)

    def validate(self, row: dict, samples: int) -> float:
        """``row``'s PSNR against the 50-step model on held-out noise (recorded in the row,
        and read back from it when it was checked on as many samples)."""
        if row.get("validation_samples") == samples:
            return row["validation_psnr"]
        if samples not in self._references:
            self._references[samples] = measure(
                self.model, self.config, REFERENCE_STEPS, samples, VALIDATION_SEED, None, distribution=False
            )[1]
        denoiser = self.denoisers[row["name"]]
        result, _ = measure(
            denoiser, self.config, row["steps"], samples, VALIDATION_SEED, self._references[samples], False
        )
        row["validation_psnr"], row["validation_samples"] = result["psnr"], samples
        return result["psnr"]


def score(
    model_name: str,
    candidates: Sequence[Configuration] | None,
    samples: int,
    progress: bool = True,
    seed: int = CALIBRATION_SEED,
) -> Scored:
    """``candidates`` (default: ``default_candidates``) built on ``model_name`` and scored on
    ``samples`` samples of the noise of ``seed`` against the plain 50-step run."""
    model, config = load(model_name)
    graph = capture(model, example_inputs(model_name))
    candidates = (
        with_reference_steps(candidates, REFERENCE_STEPS) if candidates is not None else default_candidates(graph)
    )
    if not candidates:
        raise ValueError("no candidates to search")
    calibration = reference_calibration(graph, config) if any(c.needs_calibration for c in candidates) else None
    reference_row, reference = measure(model, config, REFERENCE_STEPS, samples, seed, None, distribution=False)
    rows, skipped, denoisers = [], {}, {}
    for candidate in tqdm(candidates, desc=f"tune {model_name}", disable=not progress):
        try:
            denoisers[candidate.name] = build(candidate, model, graph, calibration, config)
        except (PassError, ValueError) as error:  # the pass does not fit this model
            skipped[candidate.name] = str(error)
            continue
        denoiser = denoisers[candidate.name]
        row, _ = measure(denoiser, config, candidate.steps, samples, seed, reference, distribution=False)
        row["mac_fraction"] = row["macs_per_sample"] / reference_row["macs_per_sample"]
        rows.append({**candidate.to_dict(), **row})
    if not rows:
        raise ValueError(f"no candidate fits {model_name}: {skipped}")
    return Scored(model, config, rows, denoisers, skipped)
