"""``diffopt bench`` and ``diffopt tune`` over any ``measure.workload.Workload``.

``bench(workload, configurations)``: every configuration run on the scoring inputs against
the first (the reference): PSNR, work fraction and the workload's further metrics, then
wall time (all configurations interleaved, a warm-up round, ``repeats`` rounds; speed-up =
the reference's median / the configuration's).

``tune(workload, min_psnr | budget)``:

1. Every candidate (default: ``measure.search.search_space`` of the workload's graph) runs
   the scoring inputs; its quality is the PSNR against the plain model's run of them, its cost
   the work fraction (``cost="macs"``) or, for the candidates that meet the floor, the median
   wall time of interleaved runs over the plain model's (``cost="time"``). A candidate that
   does not fit (``PassError``, ``CaptureError``, ``ValueError``) is skipped and reported.
2. With a floor: the cheapest candidates over it, in order, are validated on the held-out
   inputs (and, with ``metric``, ``metric(outputs, reference) >= min_metric`` there); the
   first that passes is chosen. With a budget: the best on held-out inputs of the
   best-scoring candidates within it, then its cache plan refined (``measure.plan_search``:
   the full steps moved, their count kept, each plan measured on the ``plan`` inputs) and its
   predictor learned (``Workload.learned``), each kept when it does better on held-out inputs.
3. The summary lists every row, the Pareto set (cost vs PSNR) and the choice;
   ``measure.search.save`` writes it and the choice's pass file.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from diffopt.measure.plan_search import refined_candidate
from diffopt.measure.search import check_budget, check_floor, choose, choose_within_budget, pareto, search_space
from diffopt.measure.timing import interleaved_times
from diffopt.measure.workload import Configuration, Run, Workload

Metric = Callable[[torch.Tensor, torch.Tensor], float]
FIT_ERRORS = (RuntimeError, ValueError)  # PassError and CaptureError are RuntimeErrors: the pass does not fit


class Measurements:
    """Runs of configurations on one workload, each scored against ``reference`` on the same
    inputs (the reference's run of each input set made once), and the rows scored so far."""

    def __init__(self, workload: Workload, reference: Configuration | None = None, metric: Metric | None = None):
        self.workload = workload
        self.reference_configuration = reference or Configuration("reference", None, workload.reference_steps)
        self.metric = metric
        self.rows: list[dict] = []
        self.skipped: dict[str, str] = {}
        self._references: dict[str, Run] = {}

    def reference(self, inputs: str) -> Run:
        if inputs not in self._references:
            self._references[inputs] = self.workload.run(self.reference_configuration, inputs)
        return self._references[inputs]

    def measure(self, configuration: Configuration, inputs: str = "scoring") -> tuple[dict, torch.Tensor]:
        """``configuration``'s row on ``inputs`` (``psnr``, ``mac_fraction``) and its outputs."""
        reference = self.reference(inputs)
        run = reference if configuration == self.reference_configuration else self.workload.run(configuration, inputs)
        row = {
            "psnr": self.workload.quality(run.outputs, reference.outputs),
            "mac_fraction": run.work / reference.work,
        }
        return row, run.outputs

    def scored(self, configuration: Configuration, inputs: str = "scoring") -> dict:
        """``measure``'s row with the metric's value (``metric``), where there is a metric."""
        row, outputs = self.measure(configuration, inputs)
        return row | self._metric(outputs, inputs, configuration.name)

    def score(self, configurations: Sequence[Configuration], progress: bool = False) -> list[dict]:
        """Rows of the configurations that fit, in order (also kept in ``rows``); why the
        others did not in ``skipped``."""
        self.reference("scoring")  # a plain run that fails is the caller's error, not a skipped candidate
        for configuration in tqdm(configurations, desc=f"tune {self.workload.name}", disable=not progress):
            reason = self.workload.unavailable(configuration)
            if reason is None:
                try:
                    row, outputs = self.measure(configuration)
                except FIT_ERRORS as error:
                    reason = " ".join(str(error).split())
                else:
                    row |= self._metric(outputs, "scoring", configuration.name)
                    self.rows.append({**configuration.to_dict(), **row})
                    continue
            self.skipped[configuration.name] = reason
        if not self.rows:
            raise ValueError(f"no candidate fits {self.workload.name}: {self.skipped}")
        return self.rows

    def validate(self, row: dict) -> float:
        """``row``'s PSNR on the held-out inputs (recorded in the row, with ``validation_metric``)."""
        if "validation_psnr" not in row:
            measured = self.scored(Configuration.of_row(row), "held-out")
            row["validation_psnr"] = measured["psnr"]
            if "metric" in measured:
                row["validation_metric"] = measured["metric"]
        return row["validation_psnr"]

    def refine_plan(self, row: dict, progress: bool = False) -> dict | None:
        """``row``'s cache with its plan refined on the ``plan`` inputs, scored like every row
        and added to ``rows``; None when ``row`` is not one cache with a fixed plan."""
        found = refined_candidate(row, lambda c: self.measure(c, "plan")[0]["psnr"], progress)
        if found is None:
            return None
        refined, tried = found
        return self._added(refined, plans_tried=tried)

    def learned_predictor(self, row: dict, progress: bool = False) -> dict | None:
        """``row``'s cache with a learned predictor (``Workload.learned``), scored and added."""
        learned = self.workload.learned(row)
        return None if learned is None else self._added(learned)

    def refine_choice(self, row: dict, progress: bool = False) -> dict:
        """``row``, its plan refined, then its predictor learned: each kept when it does
        better on the held-out inputs."""
        for refine in (self.refine_plan, self.learned_predictor):
            refined = refine(row, progress=progress)
            if refined is not None and refined is not row and self.validate(refined) > self.validate(row):
                row = refined
        return row

    def times(self, configurations: Sequence[Configuration], repeats: int) -> dict[str, list[float]]:
        """Wall seconds of each configuration's timed run, interleaved (``Workload.timers``)."""
        return interleaved_times(self.workload.timers(configurations), repeats, progress=True)

    def _added(self, configuration: Configuration, **extra: Any) -> dict:
        existing = next((r for r in self.rows if r["name"] == configuration.name), None)
        if existing is None:
            existing = {**configuration.to_dict(), **self.scored(configuration), **extra}
            self.rows.append(existing)
        return existing

    def _metric(self, outputs: torch.Tensor, inputs: str, name: str) -> dict[str, float]:
        if self.metric is None:
            return {}
        value = float(self.metric(outputs, self.reference(inputs).outputs))
        if math.isnan(value):
            raise ValueError(f"tune(): the metric gave NaN for candidate {name!r}: it must give a number to compare")
        return {"metric": value}


def tune(
    workload: Workload,
    min_psnr: float | None = None,
    *,
    budget: float | None = None,
    cost: str = "macs",
    candidates: Sequence[Configuration] | None = None,
    metric: Metric | None = None,
    min_metric: float | None = None,
    repeats: int = 3,
    refine: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Search ``candidates`` on ``workload`` (module docstring); the summary. Raises
    ``ValueError`` when no candidate meets the floor (or fits the budget)."""
    check_goal(min_psnr, budget, cost, metric, min_metric)
    measurements = Measurements(workload, metric=metric)
    measurements.score(candidate_list(workload, candidates), progress)
    return choose_from(measurements, min_psnr, budget, cost, min_metric, repeats, refine, progress)


def check_goal(min_psnr, budget, cost: str, metric: Metric | None, min_metric: float | None) -> None:
    """Refuse a goal ``tune`` cannot search for, naming it, before any candidate runs."""
    if (min_psnr is None) == (budget is None):
        raise ValueError("tune(): give exactly one of min_psnr= (a quality floor) or budget= (a cost ceiling)")
    if budget is not None and (cost != "macs" or metric is not None):
        raise ValueError("tune(): a budget is a fraction of the reference's MACs: use cost='macs' and no metric")
    check_floor(min_psnr if budget is None else 1.0, cost)
    if budget is not None:
        check_budget(budget)
    if (metric is None) != (min_metric is None):
        raise ValueError("tune(): metric and min_metric go together (the metric's floor on held-out inputs)")


def candidate_list(workload: Workload, candidates: Sequence[Configuration] | None) -> list[Configuration]:
    """``candidates`` at the reference's steps where they name none (default: the search space)."""
    if candidates is None:
        candidates = search_space(workload.graph().module, workload.reference_steps)
    candidates = [candidate.for_reference(workload.reference_steps) for candidate in candidates]
    if not candidates:
        raise ValueError("no candidates to search")
    return candidates


def choose_from(
    measurements: Measurements,
    min_psnr: float | None,
    budget: float | None,
    cost: str,
    min_metric: float | None,
    repeats: int,
    refine: bool,
    progress: bool,
) -> dict[str, Any]:
    """The choice among ``measurements``' scored rows for the goal (``tune``'s steps 1-3)."""
    rows, workload = measurements.rows, measurements.workload
    if cost == "time":
        feasible = [row for row in rows if row["psnr"] >= min_psnr]
        reference = measurements.reference_configuration
        times = measurements.times([reference, *map(Configuration.of_row, feasible)], repeats)
        for row in feasible:
            row["time_fraction"] = statistics.median(times[row["name"]]) / statistics.median(times[reference.name])

    def validated(row: dict) -> bool:
        good = measurements.validate(row) >= min_psnr
        return good and (min_metric is None or row["validation_metric"] >= min_metric)

    if budget is None:
        chosen, rejected = choose(rows, min_psnr, cost, validated, workload.name)
    else:
        chosen, rejected = choose_within_budget(rows, budget, cost, measurements.validate, workload.name)
        if refine:
            chosen = measurements.refine_choice(chosen, progress)
    return {
        "model": workload.name,
        "min_psnr": min_psnr,
        "budget": budget,
        "min_metric": min_metric,
        "cost": cost,
        "reference_steps": workload.reference_steps,
        **workload.description(),
        "chosen": chosen,
        "failed_validation": rejected,
        "pareto": [row["name"] for row in pareto(rows)],  # MACs vs PSNR on the scoring inputs
        "skipped": measurements.skipped,
        "rows": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def bench(
    workload: Workload,
    configurations: Sequence[Configuration],
    *,
    repeats: int = 3,
    timing_only: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Every configuration against the first (module docstring); the summary. Configurations
    that do not fit are skipped and reported."""
    if not configurations:
        raise ValueError("no configurations to run")
    configurations = [c.for_reference(configurations[0].steps or workload.reference_steps) for c in configurations]
    measurements = Measurements(workload, reference=configurations[0])
    rows = []
    for configuration in configurations:
        row = configuration.to_dict()
        if not timing_only:
            try:
                measured, outputs = measurements.measure(configuration)
            except FIT_ERRORS as error:
                measurements.skipped[configuration.name] = " ".join(str(error).split())
                continue
            row |= measured | workload.metrics(outputs, measurements.reference("scoring").outputs)
        rows.append(row)
    timed = [c for c in configurations if c.name not in measurements.skipped]
    times = measurements.times(timed, repeats)
    base = statistics.median(times[configurations[0].name])
    for row in rows:
        row["wall_s_median"] = statistics.median(times[row["name"]])
        row["wall_s_all"] = times[row["name"]]
        row["time_fraction"] = row["wall_s_median"] / base
        row["speedup"] = base / row["wall_s_median"]
    return {
        "model": workload.name,
        "reference": configurations[0].name,
        "reference_steps": configurations[0].steps,
        "repeats": repeats,
        **workload.description(),
        "rows": rows,
        "skipped": measurements.skipped,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
