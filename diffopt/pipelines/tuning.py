"""``diffopt.tune(pipe, calls, min_psnr=...)``: the cheapest pass list for a diffusers
pipeline whose images stay within a PSNR floor of the unmodified pipeline's.

1. ``calls`` are the user's pipeline call arguments (``prompt`` or ``prompt_embeds``,
   ``class_labels``, ``height``, ``num_inference_steps``, ...), each with an integer
   ``seed`` that becomes its generator. The unmodified pipeline runs each call once: its
   outputs (``output_type="np"`` unless the call says otherwise) are the reference, and the
   number of denoiser calls it made is the reference's work.
2. Each candidate (``measure.search.search_space`` of the captured denoiser, or the user's
   ``candidates``) runs the same calls through ``enable(pipe, passes)``, with its share of
   the steps: quality is the PSNR of all its outputs against the reference (data range 1
   for images in [0, 1], else the reference's range); cost is the MACs it ran over the
   reference's (``summary``'s per-stream work, ``cost="macs"``) or the median wall time of
   interleaved calls (``cost="time"``). A candidate that does not fit the model (a
   ``PassError``) is skipped and reported.
3. The cheapest candidates over the floor are validated on held-out calls
   (``validation_calls``, by default the same calls with other seeds), optionally also
   with ``metric(outputs, reference) >= min_metric``; the first that passes is chosen.
   ``out=STEM`` writes ``STEM.json``, ``STEM.png`` and the pass file ``STEM.passes.json``.
   With a ``budget`` instead of a floor, the best held-out candidate within it is chosen
   and its cache plan refined (the full steps moved, their count kept) on the calls.

Passes that need calibration statistics (ICC) are searched only when ``calibration`` is
given. The pipeline is left as it came (each candidate is enabled, run and disabled).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from diffopt.capture import CaptureError
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.measure.fidelity import psnr
from diffopt.measure.plan_search import refined_candidate
from diffopt.measure.search import (
    Candidate,
    check_budget,
    check_floor,
    choose,
    choose_within_budget,
    pareto,
    save,
    search_space,
)
from diffopt.measure.timing import median_times
from diffopt.passes.base import PassError
from diffopt.passes.registry import pass_from_dict
from diffopt.pipelines.call_key import flatten_arguments

VALIDATION_SEED_OFFSET = 1_000_000  # held-out calls: the same arguments, seeds no scored call uses
Metric = Callable[[torch.Tensor, torch.Tensor], float]


def tune(
    pipe: Any,
    calls: Sequence[Mapping[str, Any]],
    min_psnr: float | None = None,
    *,
    budget: float | None = None,
    cost: str = "macs",
    validation_calls: Sequence[Mapping[str, Any]] | None = None,
    candidates: Sequence[Candidate] | None = None,
    metric: Metric | None = None,
    min_metric: float | None = None,
    calibration: CalibrationStatistics | None = None,
    repeats: int = 3,
    out: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search pass lists for ``pipe`` (see the module docstring); returns the summary: every
    scored row, the Pareto set, the choice and what was skipped. Raises ``ValueError`` when
    no candidate meets ``min_psnr`` (and ``min_metric``) on the calls and held-out calls.
    With ``budget`` (a fraction of the reference's MACs) instead of ``min_psnr``: the best on
    held-out calls of the best-scoring candidates that cost at most that, its cache plan
    refined when that does better there (``measure.plan_search.refined_candidate``)."""
    from diffopt.pipelines import _components

    if (min_psnr is None) == (budget is None):
        raise ValueError("tune(): give exactly one of min_psnr= (a quality floor) or budget= (a cost ceiling)")
    if budget is not None and (cost != "macs" or metric is not None):
        raise ValueError("tune(): a budget is a fraction of the reference's MACs: use cost='macs' and no metric")
    check_floor(min_psnr if budget is None else 1.0, cost)
    if budget is not None:
        check_budget(budget)
    if _components(pipe):
        raise ValueError(f"tune(): diffopt is enabled on {type(pipe).__name__}: pass the plain pipeline")
    if (metric is None) != (min_metric is None):
        raise ValueError("tune(): metric and min_metric go together (the metric's floor on held-out calls)")
    calls = _checked_calls(calls, "calls", seeded=validation_calls is None)
    validation_calls = (
        held_out_calls(calls)
        if validation_calls is None
        else _checked_calls(validation_calls, "validation_calls", False)
    )
    options = _Options(min_psnr, budget, cost, candidates, metric, min_metric, calibration, repeats, progress)
    with _progress_bars(pipe, progress):
        summary = _search(pipe, calls, validation_calls, options)
    if out is not None:
        summary["pass_file"] = str(save(summary, out))
    return summary


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


class _Options(NamedTuple):
    """``tune``'s checked options, as ``_search`` takes them."""

    min_psnr: float | None
    budget: float | None
    cost: str
    candidates: Sequence[Candidate] | None
    metric: Metric | None
    min_metric: float | None
    calibration: CalibrationStatistics | None
    repeats: int
    progress: bool


def _search(pipe, calls: list[dict], validation_calls: list[dict], options: _Options) -> dict[str, Any]:
    """``tune``'s search on checked arguments: score, time, validate, choose; the summary."""
    min_psnr, budget, cost, candidates, metric, min_metric, calibration, repeats, progress = options
    runner = _PipelineRunner(pipe)
    reference_steps = runner.steps(calls[0])
    if candidates is None:
        candidates = search_space(_captured_graph(pipe, runner, calls[0]).module, reference_steps)
    candidates = [candidate.for_reference(reference_steps) for candidate in candidates]
    rows, skipped = _score(runner, list(candidates), calls, calibration, metric, progress)
    if cost == "time":
        _time(runner, [row for row in rows if row["psnr"] >= min_psnr], calls[0], reference_steps, calibration, repeats)
    held_out: dict[str, torch.Tensor] = {}

    def held_out_psnr(row: dict) -> float:
        if "validation_psnr" in row:
            return row["validation_psnr"]
        if "reference" not in held_out:
            held_out["reference"] = runner.reference(validation_calls)[0]
        candidate = Candidate(row["name"], tuple(row["passes"]), row["steps"], row["family"])
        outputs, _ = runner.candidate(candidate, validation_calls, reference_steps, calibration)
        row["validation_psnr"] = _psnr(outputs, held_out["reference"])
        if metric is not None:
            row["validation_metric"] = _metric_value(metric, outputs, held_out["reference"], row["name"])
        return row["validation_psnr"]

    def validate(row: dict) -> bool:
        return held_out_psnr(row) >= min_psnr and (metric is None or row["validation_metric"] >= min_metric)

    if budget is None:
        chosen, rejected = choose(rows, min_psnr, cost, validate, type(pipe).__name__)
    else:
        chosen, rejected = choose_within_budget(rows, budget, cost, held_out_psnr, type(pipe).__name__)
        refined = _refined_row(runner, chosen, calls, reference_steps, calibration, progress)
        if refined is not None:
            rows.append(refined)
            chosen = refined if held_out_psnr(refined) > held_out_psnr(chosen) else chosen
    summary = {
        "model": type(runner.denoiser).__name__ + f" in {type(pipe).__name__}",
        "min_psnr": min_psnr,
        "budget": budget,
        "min_metric": min_metric,
        "cost": cost,
        "reference_steps": reference_steps,
        "scored_on": f"{len(calls)} calls",
        "validated_on": f"{len(validation_calls)} held-out calls",
        "chosen": chosen,
        "failed_validation": rejected,
        "pareto": [row["name"] for row in pareto(rows)],
        "skipped": skipped,
        "rows": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return summary


def compare(
    pipe: Any,
    calls: Sequence[Mapping[str, Any]],
    candidates: Sequence[Candidate],
    *,
    repeats: int = 3,
    calibration: CalibrationStatistics | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``diffopt bench --pipeline``: every candidate's PSNR against the plain pipeline on
    ``calls``, its MAC fraction and its wall-time fraction (median of ``repeats`` interleaved
    runs of the first call after a warm-up); candidates that do not fit are skipped."""
    from diffopt.pipelines import _components

    if _components(pipe):
        raise ValueError(f"compare(): diffopt is enabled on {type(pipe).__name__}: pass the plain pipeline")
    calls = _checked_calls(calls, "calls", seeded=True)
    runner = _PipelineRunner(pipe)
    reference_steps = runner.steps(calls[0])
    candidates = [candidate.for_reference(reference_steps) for candidate in candidates]
    rows, skipped = _score(runner, candidates, calls, calibration, None, progress)
    _time(runner, rows, calls[0], reference_steps, calibration, repeats)
    return {
        "model": type(runner.denoiser).__name__ + f" in {type(pipe).__name__}",
        "reference_steps": reference_steps,
        "calls": len(calls),
        "repeats": repeats,
        "rows": rows,
        "skipped": skipped,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _captured_graph(pipe: Any, runner: _PipelineRunner, call: Mapping[str, Any]):
    """The graph ``enable`` captures for ``call`` (to find the blocks to search over)."""
    from diffopt.pipelines import _components, disable, enable

    enable(pipe)
    try:
        runner.run(call, runner.steps(call))
        return _components(pipe)[0].programs[-1].graph
    finally:
        disable(pipe)


def _score(
    runner: _PipelineRunner, candidates: list[Candidate], calls: list[dict], calibration, metric, progress: bool
) -> tuple[list[dict], dict[str, str]]:
    """Rows of the candidates that fit (PSNR and MAC fraction against the plain pipeline's
    ``calls``, and ``metric``), and why the others were skipped."""
    reference, reference_work = runner.reference(calls)
    uncalibrated = [] if calibration is not None else [c for c in candidates if c.needs_calibration]
    skipped = {c.name: "needs calibration statistics (pass calibration=)" for c in uncalibrated}
    rows = []
    desc = f"tune {type(runner.pipe).__name__}"
    for candidate in tqdm([c for c in candidates if c not in uncalibrated], desc=desc, disable=not progress):
        try:
            outputs, work = runner.candidate(candidate, calls, runner.steps(calls[0]), calibration)
        except (PassError, CaptureError, ValueError) as error:  # the pass does not fit this model
            skipped[candidate.name] = " ".join(str(error).split())
            continue
        row = {**candidate.to_dict(), "psnr": _psnr(outputs, reference), "mac_fraction": work / reference_work}
        if metric is not None:
            row["metric"] = _metric_value(metric, outputs, reference, candidate.name)
        rows.append(row)
    if not rows:
        raise ValueError(f"no candidate fits {type(runner.pipe).__name__}: {skipped}")
    return rows, skipped


def _refined_row(runner, row: dict, calls: list[dict], reference_steps: int, calibration, progress) -> dict | None:
    """``row``'s cache with its plan refined on ``calls`` (``measure.plan_search``), as a
    scored row; None when it has no fixed plan to refine."""
    reference, reference_work = runner.reference(calls)

    def run(candidate: Candidate) -> tuple[float, float]:
        outputs, work = runner.candidate(candidate, calls, reference_steps, calibration)
        return _psnr(outputs, reference), work / reference_work

    found = refined_candidate(row, lambda candidate: run(candidate)[0], progress)
    if found is None:
        return None
    refined, tried = found
    psnr_value, mac_fraction = run(refined)
    return {**refined.to_dict(), "psnr": psnr_value, "mac_fraction": mac_fraction, "plans_tried": tried}


def _metric_value(metric: Metric, outputs: torch.Tensor, reference: torch.Tensor, candidate: str) -> float:
    value = float(metric(outputs, reference))
    if math.isnan(value):
        raise ValueError(f"tune(): the metric gave NaN for candidate {candidate!r}: it must give a number to compare")
    return value


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


def _psnr(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR with data range 1 for outputs in [0, 1] (images), else the reference's range."""
    low, high = float(reference.min()), float(reference.max())
    data_range = 1.0 if 0.0 <= low and high <= 1.0 else max(high - low, 1e-12)
    return psnr(outputs, reference, data_range=data_range)


def _time(runner, rows: list[dict], call: dict, reference_steps: int, calibration, repeats: int) -> None:
    """``time_fraction`` of each row: median wall time of ``call`` over the plain pipeline's,
    the pipelines interleaved (one warm-up round, then ``repeats``)."""
    from diffopt.pipelines import enable

    pipes = {"reference": (runner.pipe, reference_steps)}
    for row in rows:
        passes = [pass_from_dict(item) for item in row["passes"]]
        pipes[row["name"]] = (enable(copy.deepcopy(runner.pipe), passes, calibration=calibration), row["steps"])

    def timed(pipe, steps) -> Callable[[int], torch.Tensor]:
        return lambda _: _PipelineRunner(pipe).run(call, round(runner.steps(call) * steps / reference_steps))

    times = median_times({name: timed(*pipe) for name, pipe in pipes.items()}, repeats)
    for row in rows:
        row["time_fraction"] = times[row["name"]] / times["reference"]


def run_call(pipe: Any, call: Mapping[str, Any], steps: int | None = None) -> torch.Tensor:
    """One call of ``pipe`` as ``tune`` makes it: an integer ``seed`` becomes its generator,
    ``steps`` (when given) its ``num_inference_steps``, ``output_type="np"`` unless the call
    says otherwise; the output comes back as one float64 tensor."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    arguments = {k: v for k, v in call.items() if k != "seed"}
    if call.get("seed") is not None:
        arguments["generator"] = torch.Generator().manual_seed(call["seed"])
    if steps is not None:
        arguments["num_inference_steps"] = max(1, steps)
    if "output_type" in parameters:
        arguments.setdefault("output_type", "np")
    if "return_dict" in parameters:
        arguments["return_dict"] = False
    output = pipe(**arguments)
    return _as_tensor(output[0] if isinstance(output, tuple) else output)


class _PipelineRunner:
    """Runs calls of one pipeline (``run_call``), the plain reference and candidates."""

    def __init__(self, pipe: Any):
        from diffopt.pipelines import _denoiser_name

        self.pipe = pipe
        self.denoiser_name = _denoiser_name(pipe)
        self.denoiser = getattr(pipe, self.denoiser_name)
        self.parameters = inspect.signature(type(pipe).__call__).parameters
        if "num_inference_steps" not in self.parameters:
            raise ValueError(f"tune(): {type(pipe).__name__}.__call__ takes no num_inference_steps")

    def steps(self, call: Mapping[str, Any]) -> int:
        steps = call.get("num_inference_steps", self.parameters["num_inference_steps"].default)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"tune(): num_inference_steps must be an integer >= 2, found {steps!r}")
        return steps

    def run(self, call: Mapping[str, Any], steps: int) -> torch.Tensor:
        return run_call(self.pipe, call, steps)

    def reference(self, calls: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, int]:
        """The unmodified pipeline's outputs of ``calls``, and how many denoiser calls they made."""
        counted = [0]
        hook = self.denoiser.register_forward_pre_hook(lambda *_: counted.__setitem__(0, counted[0] + 1))
        try:
            outputs = torch.cat([self.run(call, self.steps(call)).flatten() for call in calls])
        finally:
            hook.remove()
        return outputs, counted[0]

    def candidate(
        self, candidate: Candidate, calls: Sequence[Mapping[str, Any]], reference_steps: int, calibration
    ) -> tuple[torch.Tensor, float]:
        """``candidate``'s outputs of ``calls`` and its work in full denoiser calls (each stream
        step priced by the MACs of the variant it ran)."""
        from diffopt.pipelines import _components, disable, enable

        passes = [pass_from_dict(item) for item in candidate.passes]
        enable(self.pipe, passes, calibration=calibration)
        try:
            outputs, work, seen = [], 0.0, {}
            for call in calls:
                steps = round(self.steps(call) * candidate.steps / reference_steps)
                outputs.append(self.run(call, steps).flatten())
                runs = _stream_work(_components(self.pipe)[0])
                work += sum(w for key, w in runs.items() if key not in seen)
                seen = runs
        finally:
            disable(self.pipe)
        return torch.cat(outputs), work


def _stream_work(component) -> dict[tuple, float]:
    """The work of each recent stream run of the component in full-step equivalents: its
    steps times the share of the MACs they ran."""
    from diffopt.pipelines.report import summarize

    work = {(r.program, r.run, r.stream): len(r.variants) * (1.0 - r.work_saved) for r in summarize(component).runs}
    if any(math.isnan(w) for w in work.values()):
        raise ValueError("tune(): the program ran has no graph to count MACs in")
    return work


def _as_tensor(images: Any) -> torch.Tensor:
    """A pipeline's output (numpy array, tensor, or a list of PIL images or arrays) as float64."""
    if isinstance(images, torch.Tensor):
        return images.detach().to("cpu", torch.float64)
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(image, dtype=np.float64) for image in images])
    return torch.from_numpy(np.asarray(images, dtype=np.float64))
