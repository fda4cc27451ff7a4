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
   ``save`` writes it as JSON and PNG and the choice as a pass file
   (``diffopt.passes.registry.load_passes``), so deployment applies exactly that.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from diffopt.capture import capture
from diffopt.evaluation.bench import Configuration, build, measure, pareto, reference_calibration
from diffopt.evaluation.runs import time_runs
from diffopt.ir.files import replacing, write_text
from diffopt.ir.layers import find_blocks
from diffopt.models import example_inputs, load
from diffopt.passes.base import PassError
from diffopt.passes.registry import pass_from_dict, save_passes

CALIBRATION_SEED = 0
VALIDATION_SEED = 1_000_000  # noise no calibration run draws
COSTS = ("macs", "time")
MAX_VALIDATIONS = 5


def default_candidates(graph) -> list[Configuration]:
    """A search space over the passes that fit the model: forecast caching (order, period,
    warm-up, also at fewer steps), ICC, plain layer reuse, block caching of each block
    chain, first-block caching, and plain step reduction."""
    candidates = [Configuration(f"DDIM {steps}", (), steps, family="steps") for steps in (20, 25, 30, 35, 40)]
    for order in (1, 2):
        for period in (3, 4, 5, 6):
            for warmup in (2, 4, 6):
                for steps in (50, 35) if period <= 4 else (50,):
                    candidates.append(
                        Configuration(
                            f"forecast o{order} p{period} w{warmup}" + (f", {steps} steps" if steps != 50 else ""),
                            ({"pass": "ForecastCachePass", "order": order, "period": period, "warmup": warmup},),
                            steps,
                            family="forecast cache",
                        )
                    )
    for rank in (0, 8, 16):
        for period in (2, 3):
            candidates.append(
                Configuration(
                    f"ICC r{rank} p{period}",
                    ({"pass": "IncrementCalibratedCachePass", "rank": rank, "period": period},),
                    family="ICC" if rank else "plain reuse",
                )
            )
    for chain, blocks in find_blocks(graph.module.graph).items():
        for period in (2, 3):
            candidates.append(
                Configuration(
                    f"block cache {chain} p{period}",
                    ({"pass": "BlockCachePass", "blocks": blocks[1:-1] or blocks, "period": period},),
                    family="block cache",
                )
            )
    for threshold in (0.05, 0.1):
        candidates.append(
            Configuration(
                f"first-block cache {threshold}",
                ({"pass": "FirstBlockCachePass", "threshold": threshold},),
                family="first-block cache",
            )
        )
    return candidates


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
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, found {cost!r}")
    model, config = load(model_name)
    graph = capture(model, example_inputs(model_name))
    candidates = list(candidates) if candidates is not None else default_candidates(graph)
    if not candidates:
        raise ValueError("no candidates to search")
    calibration = reference_calibration(graph, config) if any(c.needs_calibration for c in candidates) else None
    reference_row, reference = measure(model, config, 50, samples, CALIBRATION_SEED, None, distribution=False)
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
    feasible = [row for row in rows if row["psnr"] >= min_psnr]
    if not feasible:
        best = max(rows, key=lambda r: r["psnr"]) if rows else None
        raise ValueError(
            f"no candidate reaches {min_psnr} dB on {model_name}"
            + (f" (best: {best['name']} at {best['psnr']:.1f} dB)" if best else "")
        )
    if cost == "time":
        runners = {"reference": (model, 50)} | {r["name"]: (denoisers[r["name"]], r["steps"]) for r in feasible}
        times = time_runs(runners, config, timing_batch, repeats)
        for row in feasible:
            row["time_fraction"] = statistics.median(times[row["name"]]) / statistics.median(times["reference"])
    cost_key = "mac_fraction" if cost == "macs" else "time_fraction"
    chosen, rejected = None, []
    for row in sorted(feasible, key=lambda r: r[cost_key])[:MAX_VALIDATIONS]:
        configuration = Configuration.from_dict({k: row[k] for k in Configuration.__dataclass_fields__})
        row["validation_psnr"] = held_out = _validate(model, config, configuration, denoisers, validation_samples)
        if held_out >= min_psnr:
            chosen = row
            break
        rejected.append(row["name"])
    if chosen is None:
        raise ValueError(f"the {len(rejected)} cheapest candidates over {min_psnr} dB failed validation: {rejected}")
    return {
        "model": model_name,
        "min_psnr": min_psnr,
        "cost": cost,
        "samples": samples,
        "validation_samples": validation_samples,
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


def _validate(model, config, configuration: Configuration, denoisers: dict, samples: int) -> float:
    """PSNR of ``configuration`` against the 50-step model on held-out noise."""
    _, reference = measure(model, config, 50, samples, VALIDATION_SEED, None, distribution=False)
    row, _ = measure(
        denoisers[configuration.name], config, configuration.steps, samples, VALIDATION_SEED, reference, False
    )
    return row["psnr"]


def save(summary: dict[str, Any], stem: str | os.PathLike) -> Path:
    """``<stem>.json`` (every candidate, the Pareto set, the choice), ``<stem>.png`` and the
    chosen pass list ``<stem>.passes.json``; returns the pass file's path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text(stem.with_suffix(".json"), json.dumps(summary, indent=2))
    _plot(summary, stem.with_suffix(".png"))
    chosen = summary["chosen"]
    return save_passes(
        stem.with_name(stem.name + ".passes.json"),
        [pass_from_dict(item) for item in chosen["passes"]],
        steps=chosen["steps"],
        model=summary["model"],
        min_psnr=summary["min_psnr"],
        psnr=chosen["psnr"],
        validation_psnr=chosen["validation_psnr"],
        mac_fraction=chosen["mac_fraction"],
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The Pareto set and the choice, as lines for the terminal."""
    by_name = {row["name"]: row for row in summary["rows"]}
    lines = [f"Pareto set on {summary['model']} (MACs vs PSNR, {summary['samples']} calibration samples):"]
    for name in summary["pareto"]:
        row = by_name[name]
        lines.append(f"  {row['mac_fraction']:.3f} of the MACs  {row['psnr']:6.1f} dB  {name}")
    chosen = summary["chosen"]
    lines.append(
        f"chosen for >= {summary['min_psnr']} dB: {chosen['name']}: {chosen['steps']} steps, "
        f"{chosen['mac_fraction']:.3f} of the MACs, {chosen['psnr']:.1f} dB on calibration noise, "
        f"{chosen['validation_psnr']:.1f} dB on {summary['validation_samples']} held-out samples"
    )
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    rows = summary["rows"]
    for family in sorted({r["family"] for r in rows}):
        members = [r for r in rows if r["family"] == family]
        axes.scatter([r["mac_fraction"] for r in members], [min(r["psnr"], 60) for r in members], label=family, s=14)
    front = [r for name in summary["pareto"] for r in rows if r["name"] == name]
    axes.plot([r["mac_fraction"] for r in front], [min(r["psnr"], 60) for r in front], "k--", lw=0.8, label="Pareto")
    chosen = summary["chosen"]
    axes.scatter([chosen["mac_fraction"]], [min(chosen["psnr"], 60)], marker="*", s=200, c="red", label="chosen")
    axes.axhline(summary["min_psnr"], color="gray", lw=0.8, ls=":")
    axes.set(xlabel="MACs / 50-step model", ylabel="PSNR vs 50 steps (dB, capped at 60)")
    axes.set_title(f"diffopt tune {summary['model']} --min-psnr {summary['min_psnr']}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    with replacing(path) as partial:
        figure.savefig(partial, dpi=110, format="png")
    plt.close(figure)
