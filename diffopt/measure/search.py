"""The search behind ``diffopt tune``: candidate pass lists for a captured graph, the Pareto
set of scored candidates, the validated choice, and the files a tune writes.

A candidate is a ``measure.workload.Configuration``: a pass list (pass-file dicts,
``passes.registry``) and a step count, relative to a reference run of ``steps`` steps.
Scoring is ``measure.tuning``'s, on any workload. A scored candidate is a row: a dict with
at least ``name``, ``family``, ``passes``, ``steps``, ``psnr`` and ``mac_fraction`` (its MACs
over the reference run's).
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffopt.ir.layers import find_blocks
from diffopt.measure.workload import Configuration
from diffopt.passes.registry import load_passes, pass_from_dict
from diffopt.util.files import read_json, replacing_together

logger = logging.getLogger("diffopt")

COSTS = ("macs", "time")
COST_KEYS = {"macs": "mac_fraction", "time": "time_fraction"}
MAX_VALIDATIONS = 5  # the cheapest feasible candidates tried on held-out inputs, in order
TUNE_FILES = {"json": ".json", "md": ".md", "png": ".png", "passes": ".passes.json"}
STEP_FRACTIONS = (0.4, 0.5, 0.6, 0.7, 0.8)  # plain step reduction
FORECAST_FEWER_STEPS = 0.7  # caches with a short period are also tried at this fraction of the steps
CACHE_INTERVALS = (3, 4, 5, 6, 7, 8, 10)  # full steps every i steps (TaylorSeer's plan) ...
CACHE_WARMUPS = (1, 2, 3, 5)  # ... after D full warm-up steps (the peers' D in {1, 3, 5} and diffopt's 2)
LONG_WARMUP_PLANS = ((8, 3),)  # (D, i): 0.45 of the MACs at 50 steps, unet-digits' best plan at a 0.50 budget


def search_space(graph: torch.fx.GraphModule, steps: int = 50) -> list[Configuration]:
    """Candidates that fit ``graph`` for a reference of ``steps`` steps: fewer steps; caches of
    the product target x plan x predictor (``cache_candidates``); ICC and plain layer reuse;
    block caching of each block chain ``ir.layers.find_blocks`` sees (transformer chains, UNet
    down/up blocks); first-block caching. Chain caches walk the only chain, or all chains
    joined (Flux-like models). Passes that turn out not to fit are the scorer's to skip
    (they raise ``PassError``)."""
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"search_space(): steps is the reference's step count (>= 2), found {steps!r}")
    chains = find_blocks(graph.graph)
    joined = [name for name, blocks in chains.items() if len(blocks) >= 2]
    # chain passes walk the only chain, or every chain joined in graph order (Flux's double- then single-stream
    # blocks); a UNet's down and up blocks are no chain (those passes skip it, block caching covers it)
    unet = {"down_blocks", "up_blocks"} <= set(chains)
    chain = {"container": joined} if len(joined) > 1 and not unet else {}
    fewer = sorted({max(1, round(steps * f)) for f in STEP_FRACTIONS} - {steps})
    candidates = [Configuration(f"{n} steps", (), n, family="steps") for n in fewer]
    candidates += cache_candidates(chains, chain, unet, steps)
    for rank in (0, 8, 16):
        for period in (2, 3):
            candidates.append(
                Configuration(
                    f"ICC r{rank} p{period}",
                    ({"pass": "IncrementCalibratedCachePass", "rank": rank, "period": period},),
                    steps,
                    family="ICC" if rank else "plain reuse",
                )
            )
    for name, blocks in chains.items():
        for period in (2, 3):
            candidates.append(
                Configuration(
                    f"block cache {name} p{period}",
                    ({"pass": "BlockCachePass", "blocks": blocks[1:-1] or blocks, "period": period},),
                    steps,
                    family="block cache",
                )
            )
    for threshold in (0.05, 0.1):
        candidates.append(
            Configuration(
                f"first-block cache {threshold}",
                ({"pass": "FirstBlockCachePass", "threshold": threshold, **chain},),
                steps,
                family="first-block cache",
            )
        )
    return candidates


def cache_candidates(chains: dict[str, list[str]], chain: dict, unet: bool, steps: int) -> list[Configuration]:
    """``CachePass`` candidates, the product of: targets (a chain's span, its residual or its
    output; a UNet's up blocks), plans (TaylorSeer's first-D-then-every-i, the shape the peers
    win with, and periodic ones, at fewer steps too) and predictors (Newton order 1,
    TaylorSeer's order 2). Family ``forecast cache``."""
    if unet:
        targets = {block: {"kind": "blocks", "blocks": [block]} for block in chains["up_blocks"][1:]}
    elif any(len(blocks) >= 2 for blocks in chains.values()):
        targets = {f"span {value}": {"kind": "span", "value": value, **chain} for value in ("output", "residual")}
    else:
        return []
    plans = {
        f"D{d} i{i}": {"kind": "taylorseer", "warmup": d, "period": i} for d in CACHE_WARMUPS for i in CACHE_INTERVALS
    }
    plans |= {f"D{d} i{i}": {"kind": "taylorseer", "warmup": d, "period": i} for d, i in LONG_WARMUP_PLANS}
    plans |= {f"p{p} w3": {"kind": "periodic", "period": p, "warmup": 3} for p in (4, 6)}
    predictors = {"newton o1": {"kind": "newton", "order": 1}, "taylorseer o2": {"kind": "taylorseer", "order": 2}}
    short = max(2, round(steps * FORECAST_FEWER_STEPS))
    candidates = []
    for target_name, target in targets.items():
        for plan_name, plan in plans.items():
            for predictor_name, predictor in predictors.items():
                for n in (steps, short) if plan.get("period", 0) <= 4 and short != steps else (steps,):
                    suffix = f", {n} steps" if n != steps else ""
                    cache = {"pass": "CachePass", "target": target, "policy": plan, "predictor": predictor}
                    candidates.append(
                        Configuration(
                            f"{target_name} {plan_name} {predictor_name}{suffix}", (cache,), n, family="forecast cache"
                        )
                    )
    return candidates


def pareto(rows: Sequence[dict], cost: str = "mac_fraction", quality: str = "psnr") -> list[dict]:
    """The rows no other row beats in both cost (lower) and quality (higher), cheapest first."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r[cost], -r[quality])):
        if row[quality] > best:
            front.append(row)
            best = row[quality]
    return front


def check_floor(min_psnr: Any, cost: Any) -> None:
    """Refuse a quality floor or cost a tune cannot use, naming it."""
    if (
        isinstance(min_psnr, bool)
        or not isinstance(min_psnr, (int, float))
        or not math.isfinite(min_psnr)
        or min_psnr <= 0
    ):
        raise ValueError(f"min_psnr must be a finite number of dB > 0, found {min_psnr!r}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, found {cost!r}")


def check_budget(budget: Any) -> None:
    """Refuse a budget a tune cannot use, naming it (before any candidate runs)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"the budget is a fraction of the reference's cost in (0, 1], found {budget!r}")


def choose(
    rows: Sequence[dict], min_psnr: float, cost: str, validate: Callable[[dict], bool], where: str
) -> tuple[dict, list[str]]:
    """The cheapest row over ``min_psnr`` (of equally cheap ones, the best) that ``validate``
    (held-out inputs) accepts, and the names of the cheaper ones it rejected. Raises
    ``ValueError`` when nothing qualifies."""
    feasible = [row for row in rows if row["psnr"] >= min_psnr]
    if not feasible:
        best = max(rows, key=lambda r: r["psnr"]) if rows else None
        raise ValueError(
            f"no candidate reaches {min_psnr} dB on {where}"
            + (f" (best: {best['name']} at {best['psnr']:.1f} dB)" if best else "")
        )
    rejected = []
    for row in sorted(feasible, key=lambda r: (r[COST_KEYS[cost]], -r["psnr"]))[:MAX_VALIDATIONS]:
        if validate(row):
            return row, rejected
        rejected.append(row["name"])
    raise ValueError(f"the {len(rejected)} cheapest candidates over {min_psnr} dB failed validation: {rejected}")


def tune_files(stem: str | os.PathLike) -> dict[str, Path]:
    """The files a tune writes for ``stem``, used as given (``run-1.5`` gives ``run-1.5.json``)."""
    stem = os.fspath(stem)
    return {kind: Path(f"{stem}{suffix}") for kind, suffix in TUNE_FILES.items()}


def choose_within_budget(
    rows: Sequence[dict], budget: float, cost: str, validate: Callable[[dict], float], where: str
) -> tuple[dict, list[str]]:
    """The row with the best held-out quality (``validate`` gives its held-out PSNR) among the
    ``MAX_VALIDATIONS`` best-scoring rows whose cost is at most ``budget``, and the names of
    the others tried. Raises ``ValueError`` when no row fits the budget."""
    check_budget(budget)
    fitting = [row for row in rows if row[COST_KEYS[cost]] <= budget + 1e-9]
    if not fitting:
        cheapest = min(rows, key=lambda r: r[COST_KEYS[cost]]) if rows else None
        raise ValueError(
            f"no candidate costs at most {budget} of the reference on {where}"
            + (f" (cheapest: {cheapest['name']} at {cheapest[COST_KEYS[cost]]:.3f})" if cheapest else "")
        )
    tried = sorted(fitting, key=lambda r: -r["psnr"])[:MAX_VALIDATIONS]
    scores = {row["name"]: validate(row) for row in tried}
    best = max(tried, key=lambda row: scores[row["name"]])
    return best, [row["name"] for row in tried if row is not best]


def save(summary: dict[str, Any], stem: str | os.PathLike) -> Path:
    """``<stem>.json`` (every candidate, the Pareto set, the choice), ``<stem>.md`` (the table),
    ``<stem>.png`` (where matplotlib is installed) and the chosen pass list
    ``<stem>.passes.json`` (with its step count and the reference's); returns the pass file's
    path. The files are one set: all are written before any replaces an earlier run's
    (``util.files.replacing_together``), and each carries the run's id (``load_result`` checks it)."""
    files = tune_files(stem)
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    summary["run_id"] = summary.get("run_id") or uuid.uuid4().hex
    chosen = summary["chosen"]
    pass_file = {
        "passes": chosen["passes"],
        "steps": chosen["steps"],
        "reference_steps": summary["reference_steps"],
        "model": summary["model"],
        "min_psnr": summary["min_psnr"],
        "budget": summary.get("budget"),
        "psnr": chosen["psnr"],
        "validation_psnr": chosen["validation_psnr"],
        "mac_fraction": chosen["mac_fraction"],
        "run_id": summary["run_id"],
    }
    for item in chosen["passes"]:  # a pass list that cannot load is never written
        pass_from_dict(item)
    plotted = _plot_available()
    kinds = [kind for kind in ("json", "md", "png", "passes") if kind != "png" or plotted]
    with replacing_together([files[kind] for kind in kinds]) as temporaries:
        staged = dict(zip(kinds, temporaries))
        staged["json"].write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        staged["md"].write_text(table(summary), encoding="utf-8")
        staged["passes"].write_text(json.dumps(pass_file, indent=2) + "\n", encoding="utf-8")
        if plotted:
            _plot(summary, staged["png"])
    return files["passes"]


def load_result(stem: str | os.PathLike) -> tuple[dict[str, Any], list, dict[str, Any]]:
    """(summary, passes, pass-file fields) of a tune's files, refused when they come from
    different runs (a tune interrupted between its renames)."""
    files = tune_files(stem)
    summary = read_json(files["json"], "a tune result")
    passes, fields = load_passes(files["passes"])
    if not isinstance(summary, dict) or summary.get("run_id") != fields.get("run_id"):
        raise ValueError(
            f"{files['json']} and {files['passes']} come from different tune runs (run ids "
            f"{summary.get('run_id') if isinstance(summary, dict) else None!r} and {fields.get('run_id')!r}): "
            f"a tune was interrupted; run it again"
        )
    return summary, passes, fields


def table(summary: dict[str, Any]) -> str:
    """Every scored candidate as a markdown table, cheapest first; the choice and the Pareto
    set marked."""
    chosen, front = summary["chosen"]["name"], set(summary["pareto"])
    lines = [
        f"# diffopt tune {summary['model']}: {goal(summary)}",
        "",
        f"Scored on {summary['scored_on']}, validated on {summary['validated_on']}; reference: "
        f"{summary['reference_steps']} steps. `*` chosen, `P` on the Pareto set (MACs vs PSNR).",
        "",
        "| | candidate | steps | MACs vs reference | PSNR (dB) | held-out PSNR (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(summary["rows"], key=lambda r: (r["mac_fraction"], -r["psnr"])):
        mark = ("*" if row["name"] == chosen else "") + ("P" if row["name"] in front else "")
        held_out = f"{row['validation_psnr']:.1f}" if "validation_psnr" in row else ""
        lines.append(
            f"| {mark} | {row['name']} | {row['steps']} | {row['mac_fraction']:.3f} | {row['psnr']:.1f} | {held_out} |"
        )
    return "\n".join(lines) + "\n"


def goal(summary: dict[str, Any]) -> str:
    """What a tune asked for: a PSNR floor or a MAC budget."""
    if summary.get("budget") is not None:
        return f"<= {summary['budget']} of the reference's {summary.get('cost', 'macs')}"
    return f">= {summary['min_psnr']} dB"


def format_summary(summary: dict[str, Any]) -> str:
    """The Pareto set and the choice, as lines for the terminal."""
    by_name = {row["name"]: row for row in summary["rows"]}
    lines = [f"Pareto set on {summary['model']} (MACs vs PSNR, scored on {summary['scored_on']}):"]
    for name in summary["pareto"]:
        row = by_name[name]
        lines.append(f"  {row['mac_fraction']:.3f} of the MACs  {row['psnr']:6.1f} dB  {name}")
    chosen = summary["chosen"]
    lines.append(
        f"chosen for {goal(summary)}: {chosen['name']}: {chosen['steps']} steps "
        f"(reference {summary['reference_steps']}), {chosen['mac_fraction']:.3f} of the MACs, "
        f"{chosen['psnr']:.1f} dB when scored, {chosen['validation_psnr']:.1f} dB on {summary['validated_on']}"
    )
    return "\n".join(lines)


def _plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("no Pareto plot written: matplotlib is not installed (pip install diffopt[eval])")
        return False
    return True


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
    if summary["min_psnr"] is not None:
        axes.axhline(summary["min_psnr"], color="gray", lw=0.8, ls=":")
    if summary.get("budget") is not None:
        axes.axvline(summary["budget"], color="gray", lw=0.8, ls=":")
    axes.set(xlabel="MACs / reference run", ylabel="PSNR vs reference (dB, capped at 60)")
    axes.set_title(f"diffopt tune {summary['model']}: {goal(summary)}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)
