"""Bench files and bench results: the configurations a ``diffopt bench`` runs, the digits
models' bench (``run_bench``: ``measure.tuning.bench`` on ``evaluation.workload``'s digits,
with the reference's FD seed noise), and the table, JSON and Pareto plot of any bench.

A bench file is ``{"model": ..., "title": ..., "configurations": [...]}``, each configuration
a ``measure.workload.Configuration`` as a dict; the first is the reference the others are
measured against. A file for pipelines may name no model.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffopt.evaluation.metrics.digits import digits_fd
from diffopt.evaluation.runs import generate
from diffopt.evaluation.workload import BASELINE_KINDS, REFERENCE_STEPS, DigitsWorkload
from diffopt.measure.search import pareto
from diffopt.measure.tuning import bench
from diffopt.measure.workload import Configuration
from diffopt.models.zoo import get_spec
from diffopt.util.files import read_json, replacing, write_text


def load_configurations(path: str | os.PathLike) -> tuple[str | None, str, list[Configuration]]:
    """(model name, title, configurations) of a bench file
    ``{"model": ..., "title": ..., "configurations": [...]}``; a file for pipelines
    (``diffopt bench --pipeline``) may name no model (``None``)."""
    data = read_json(path, "a bench file")
    if not isinstance(data, dict) or not isinstance(data.get("configurations"), list):
        raise ValueError(f"{path} is not a bench file: expected an object with a 'configurations' list")
    model = data.get("model")
    if not isinstance(model, (str, type(None))) or not isinstance(data.get("title", ""), str):
        raise ValueError(f"{path}: 'model' and 'title' are strings, found {model!r:.60}, {data.get('title')!r:.60}")
    if model is not None:
        get_spec(model)  # an unknown model is named before any run
    if not data["configurations"]:
        raise ValueError(f"{path}: 'configurations' is empty: the first one is the reference")
    try:
        configurations = [Configuration.from_dict(item) for item in data["configurations"]]
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    unknown = [c.name for c in configurations if c.baseline and c.baseline.get("kind") not in BASELINE_KINDS]
    if unknown:
        raise ValueError(f"{path}: configurations {unknown}: a baseline's kind is one of {BASELINE_KINDS}")
    names = [c.name for c in configurations]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: configuration names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return model, data.get("title", f"Configurations on {model or 'a pipeline'}"), configurations


def run_bench(
    model_name: str,
    configurations: Sequence[Configuration],
    *,
    samples: int = 600,
    timing_batch: int = 50,
    repeats: int = 3,
    timing_only: bool = False,
    seed: int = 0,
    reference_seeds: int = 1,
) -> dict[str, Any]:
    """``measure.tuning.bench`` on ``model_name``'s digits (``evaluation.workload``): every
    configuration measured against the first. With ``reference_seeds`` > 1 the reference also
    samples that many noise seeds in all, for its FD's seed noise (mean and standard
    deviation in ``reference_fd``)."""
    workload = DigitsWorkload(model_name, samples=samples, timing_batch=timing_batch, seed=seed)
    summary = bench(workload, configurations, repeats=repeats, timing_only=timing_only)
    reference_fd = []
    if not timing_only and reference_seeds > 1:
        first = configurations[0].for_reference(REFERENCE_STEPS)
        denoiser = workload.denoiser(first)
        reference_fd = [summary["rows"][0]["fd"]] + [
            digits_fd(generate(denoiser, workload.config, first.steps, samples, seed=seed + 100_000 * k))
            for k in range(1, reference_seeds)
        ]
    return {
        **summary,
        "samples": None if timing_only else samples,
        "seed": seed,
        "reference_fd": (
            {"seeds": reference_fd, "mean": statistics.mean(reference_fd), "stdev": statistics.stdev(reference_fd)}
            if len(reference_fd) > 1
            else None
        ),
        "machine": platform.processor() or platform.machine(),
    }


def to_markdown(summary: dict, title: str, command: str) -> str:
    """The bench's table: wall time only, or quality, work and speed-up (with the digits
    metrics where the workload has them) against the reference."""
    reference, rows = summary["reference"], summary["rows"]
    timing = (
        f"median of {summary['repeats']} interleaved runs of {summary['timed_on']} after a warm-up round, "
        f"torch {summary['torch']}, {summary['threads']} CPU threads"
    )
    lines = [f"# {title}", "", f"`{command}`", ""]
    if not rows or "psnr" not in rows[0]:
        lines += [
            f"Wall time only: {timing}.",
            "",
            f"| configuration | steps | wall s (median) | all runs (s) | speed-up vs {reference} |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['name']} | {r['steps']} | {r['wall_s_median']:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in r['wall_s_all'])} | {r['speedup']:.2f}x |"
            for r in rows
        ]
        return "\n".join(lines) + "\n"
    noise = summary.get("reference_fd")
    if noise:
        band = noise["mean"] + 2 * noise["stdev"]
        lines += [
            f"Seed noise of the FD: {reference} over {len(noise['seeds'])} noise seeds has FD "
            f"{noise['mean']:.2f} ± {noise['stdev']:.2f} (mean + 2 sd: {band:.2f}).",
            "",
        ]
    digits = "fd" in rows[0]
    headers = ["configuration", "steps", f"MACs vs {reference}", "wall speed-up", "PSNR (dB)"]
    headers += ["digits FD", "accuracy", "label agreement"] if digits else []
    lines += [
        f"Quality on {summary['scored_on']}, the same for every configuration; wall time: {timing}. "
        f"PSNR, label agreement and the MAC and time ratios are against {reference}.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for r in rows:
        cells = [r["name"], str(r["steps"]), f"{r['mac_fraction']:.3f}", f"{r['speedup']:.2f}x", f"{r['psnr']:.1f}"]
        cells += [f"{r['fd']:.2f}", f"{r['accuracy']:.3f}", f"{r['label_agreement']:.3f}"] if digits else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """PSNR (and digits FD, where measured) against MACs per family, with the PSNR Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["name"] != summary["reference"]]
    digits = bool(rows) and "fd" in rows[0]
    figure, axes = plt.subplots(1, 2 if digits else 1, figsize=(12 if digits else 6.5, 4.5), squeeze=False)
    left = axes[0][0]
    for family in sorted({r["family"] for r in rows}):
        members = [r for r in rows if r["family"] == family]
        macs = [r["mac_fraction"] for r in members]
        left.scatter(macs, [min(r["psnr"], 60) for r in members], label=family or "other")
        if digits:
            axes[0][1].scatter(macs, [r["fd"] for r in members], label=family or "other")
    front = pareto(rows)
    left.plot([r["mac_fraction"] for r in front], [min(r["psnr"], 60) for r in front], "k--", lw=0.8, label="Pareto")
    reference = summary["reference"]
    left.set(xlabel=f"MACs / {reference}", ylabel="PSNR (dB, capped at 60)", title="paired fidelity vs compute")
    if digits:
        axes[0][1].set(
            xlabel=f"MACs / {reference}", ylabel="digits FD (lower is better)", title="FD vs compute", yscale="log"
        )
    left.legend(fontsize=8)
    figure.suptitle(f"{summary['model']}: {title} ({summary['scored_on']})")
    figure.tight_layout()
    with replacing(path) as partial:
        figure.savefig(partial, dpi=110, format="png")
    plt.close(figure)


def write_results(summary: dict, stem: str | os.PathLike, title: str, command: str) -> None:
    """``<stem>.json``, ``<stem>.md`` and (with quality rows) ``<stem>.png``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(f"{stem}.json"), json.dumps({**summary, "command": command, "title": title}, indent=2, default=str))
    write_text(Path(f"{stem}.md"), to_markdown(summary, title, command))
    if summary["rows"] and "psnr" in summary["rows"][0]:
        plot(summary, Path(f"{stem}.png"), title)
