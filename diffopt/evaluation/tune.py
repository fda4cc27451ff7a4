"""``diffopt tune``: the cheapest configuration whose quality meets a floor, on a shipped model.

1. Every candidate (``bench.Configuration``: a pass list and a step count) samples
   ``samples`` digits from calibration noise; its quality is the PSNR against the
   unmodified model's 50-step samples from the same noise, its cost the MACs counted
   during that run (``cost="macs"``) or, for the candidates that meet the floor, the
   median wall time of interleaved runs on this machine (``cost="time"``).
2. The candidates that meet the floor, cheapest first, are validated on held-out noise
   (other seeds, ``validation_samples`` digits): the first that meets the floor there
   too is chosen. One that fails validation is reported and the next is tried.
3. With a budget, the choice's cache plan is then refined (``Scored.refine_plan``: its full
   steps moved, their count and so the MACs kept, ``measure.plan_search``) on a few
   calibration samples, and the refined plan replaces the choice when it also does better
   on the held-out noise. Then its predictor is replaced by a learned one
   (``Scored.learned_predictor``: fitted for that plan on noise of its own seed,
   ``measure.predictor_fit``), which replaces the choice on the same condition.
4. The result lists every candidate, the Pareto set (cost vs PSNR) and the choice;
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
from diffopt.evaluation.runs import generate, time_runs
from diffopt.ir.program import StepProgram
from diffopt.measure.plan_search import refined_candidate
from diffopt.measure.predictor_fit import learned_candidate
from diffopt.measure.search import (
    Candidate,
    check_budget,
    check_floor,
    choose,
    choose_within_budget,
    pareto,
    search_space,
)
from diffopt.models import example_inputs, load
from diffopt.passes.base import PassError

CALIBRATION_SEED = 0
VALIDATION_SEED = 1_000_000  # noise no calibration run draws
PLAN_SEARCH_SAMPLES = 24  # samples per plan the plan search measures
LEARNED_FIT_SEED = 500_000  # the noise a learned predictor is fitted on (neither scoring's nor validation's)
LEARNED_FIT_SAMPLES = 16


def default_candidates(graph) -> list[Configuration]:
    """``measure.search.search_space`` of the captured model at 50 steps, as bench configurations."""
    return [_configuration(c) for c in search_space(graph.module, REFERENCE_STEPS)]


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
    refine_plan: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Search ``candidates`` (default: ``default_candidates``) on ``model_name``; returns the
    summary (see the module docstring). With ``min_psnr``: the cheapest candidate over that
    floor on held-out noise (``ValueError`` when none is); with ``budget`` (a fraction of the
    reference's cost) instead: the best on held-out noise of the best-scoring candidates that
    cost at most that, its cache plan refined and its predictor learned where each does better
    there (``refine_plan``: both steps, or neither)."""
    if (min_psnr is None) == (budget is None):
        raise ValueError("tune(): give exactly one of min_psnr= (a quality floor) or budget= (a cost ceiling)")
    if budget is not None and cost != "macs":
        raise ValueError("tune(): a budget is a fraction of the reference's MACs: use cost='macs' with it")
    check_floor(min_psnr if budget is None else 1.0, cost)
    if budget is not None:
        check_budget(budget)
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
        if refine_plan:
            chosen = scored.refine_choice(chosen, validation_samples, progress)
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
    """Every candidate scored on one model: its rows (PSNR and MAC fraction on ``samples``
    samples of the noise of ``seed``), the denoisers built for them, and what was skipped
    and why."""

    model: torch.nn.Module
    config: dict
    graph: Any
    calibration: Any
    samples: int
    seed: int
    rows: list[dict]
    denoisers: dict[str, Any]
    skipped: dict[str, str]
    _references: dict[tuple[int, int], tuple[dict, torch.Tensor]] = field(default_factory=dict)

    def reference(self, samples: int, seed: int) -> tuple[dict, torch.Tensor]:
        """The plain 50-step run's row and images on ``samples`` samples of ``seed``'s noise."""
        if (samples, seed) not in self._references:
            self._references[samples, seed] = measure(
                self.model, self.config, REFERENCE_STEPS, samples, seed, None, distribution=False
            )
        return self._references[samples, seed]

    def denoiser(self, candidate: Configuration) -> Any:
        """``candidate`` built on the model (once; kept in ``denoisers``)."""
        if candidate.name not in self.denoisers:
            self.denoisers[candidate.name] = build(candidate, self.model, self.graph, self.calibration, self.config)
        return self.denoisers[candidate.name]

    def measure(self, candidate: Configuration, samples: int, seed: int) -> dict:
        """``candidate`` measured against the reference on the same noise: its row
        (``psnr``, ``mac_fraction``)."""
        reference_row, reference = self.reference(samples, seed)
        row, _ = measure(self.denoiser(candidate), self.config, candidate.steps, samples, seed, reference, False)
        row["mac_fraction"] = row["macs_per_sample"] / reference_row["macs_per_sample"]
        return row

    def validate(self, row: dict, samples: int) -> float:
        """``row``'s PSNR against the 50-step model on held-out noise (recorded in the row,
        and read back from it when it was checked on as many samples)."""
        if row.get("validation_samples") == samples:
            return row["validation_psnr"]
        candidate = Configuration(row["name"], tuple(row["passes"]), row["steps"], family=row["family"])
        row["validation_psnr"] = self.measure(candidate, samples, VALIDATION_SEED)["psnr"]
        row["validation_samples"] = samples
        return row["validation_psnr"]

    def refine_plan(self, row: dict, progress: bool = False) -> dict | None:
        """``row``'s cache with its plan refined (``measure.plan_search``: its full steps
        moved, their count kept) on ``PLAN_SEARCH_SAMPLES`` samples of the scoring noise (at
        most the scoring's), scored like every row and added to ``rows``; None when ``row`` is
        not one cache with a fixed plan."""
        samples = min(PLAN_SEARCH_SAMPLES, self.samples)
        found = refined_candidate(row, lambda c: self.measure(_configuration(c), samples, self.seed)["psnr"], progress)
        if found is None:
            return None
        refined, tried = found
        existing = next((r for r in self.rows if r["name"] == refined.name), None)
        if existing is not None:
            return existing
        refined_row = {**refined.to_dict(), **self.measure(_configuration(refined), self.samples, self.seed)}
        self.rows.append({**refined_row, "plans_tried": tried})
        return self.rows[-1]

    def learned_predictor(self, row: dict, progress: bool = False) -> dict | None:
        """``row``'s cache with a ``Learned`` predictor fitted for its plan on
        ``LEARNED_FIT_SAMPLES`` samples of ``LEARNED_FIT_SEED``'s noise, scored like every row
        and added to ``rows``; None when ``row`` is not one cache with a fixed plan."""

        def sample(denoiser, steps):
            return generate(denoiser, self.config, steps, LEARNED_FIT_SAMPLES, seed=LEARNED_FIT_SEED)

        learned = learned_candidate(row, StepProgram.from_captured(self.graph), sample)
        if learned is None:
            return None
        existing = next((r for r in self.rows if r["name"] == learned.name), None)
        if existing is None:
            existing = {**learned.to_dict(), **self.measure(_configuration(learned), self.samples, self.seed)}
            self.rows.append(existing)
        return existing

    def refine_choice(self, row: dict, validation_samples: int, progress: bool = False) -> dict:
        """``row``, its plan refined (``refine_plan``), then its predictor learned
        (``learned_predictor``): each step kept when it does better on held-out noise."""
        for refine in (self.refine_plan, self.learned_predictor):
            refined = refine(row, progress=progress)
            if refined is not None and refined is not row:
                better = self.validate(refined, validation_samples) > self.validate(row, validation_samples)
                row = refined if better else row
        return row


def _configuration(candidate: Candidate) -> Configuration:
    return Configuration(candidate.name, candidate.passes, candidate.steps, family=candidate.family)


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
    scored = Scored(model, config, graph, calibration, samples, seed, [], {}, {})
    for candidate in tqdm(candidates, desc=f"tune {model_name}", disable=not progress):
        try:
            scored.denoiser(candidate)
        except (PassError, ValueError) as error:  # the pass does not fit this model
            scored.skipped[candidate.name] = str(error)
            continue
        scored.rows.append({**candidate.to_dict(), **scored.measure(candidate, samples, seed)})
    if not scored.rows:
        raise ValueError(f"no candidate fits {model_name}: {scored.skipped}")
    return scored
