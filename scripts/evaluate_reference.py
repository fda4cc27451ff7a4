"""Measure the shipped reference models and the metrics' dynamic range.

    python scripts/evaluate_reference.py            # writes benchmarks/results/reference_quality.json,
                                                    # docs/metrics.md and docs/images/<model>.png
    python scripts/evaluate_reference.py --models unet-digits   # re-measure one model, keep the other rows

Every model is sampled class-conditionally (equal counts per class) from seeded noise.
digits FD is measured against the real train split; "real held-out" is the floor a
perfect model reaches at 600 samples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from diffopt import Sampler, make_scheduler
from diffopt.evaluation.data import load_digits_split
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd
from diffopt.evaluation.metrics.grid import save_grid
from diffopt.models import NULL_CLASS, load

RESULTS = Path("benchmarks/results/reference_quality.json")
MODELS = ("dit-digits", "unet-digits", "dit-digits-flow")
DOC = Path("docs/metrics.md")


def generate(name: str, steps: int, n: int, seed: int, guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    model, config = load(name)
    labels = torch.arange(n) % 10
    sampler = Sampler(
        make_scheduler(config, num_steps=steps),
        guidance_scale=guidance,
        null_conditions=(torch.tensor(NULL_CLASS),),
        progress=False,
    )
    images = torch.cat(
        [
            sampler.sample(
                model, (labels[i : i + 200],), shape=(len(labels[i : i + 200]), 1, 16, 16), seed=seed * 1000 + i
            )
            for i in range(0, n, 200)
        ]
    )
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=5, help="seeds for the FD spread of dit-digits at 50 steps")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help=f"re-measure only these models (e.g. after retraining one); the other rows are kept from {RESULTS}",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    previous = json.loads(RESULTS.read_text()) if set(args.models) != set(MODELS) else None
    if previous is not None and previous["samples"] != args.samples:
        raise SystemExit(
            f"{RESULTS} was measured with {previous['samples']} samples; re-measure all models "
            f"or pass --samples {previous['samples']}"
        )
    test = load_digits_split("test")
    rows = [
        measure("real held-out (600) vs real train", test.images, test.labels),
        measure("pure noise", torch.randn(args.samples, 1, 16, 16, generator=torch.Generator().manual_seed(0)), None),
    ]
    for name in MODELS:
        if name in args.models:
            rows += model_rows(name, args.samples, args.seeds)
        else:
            rows += [row for row in previous["rows"] if row.get("model") == name]
    spread = [
        row["fd"] for row in rows if row.get("model") == "dit-digits" and row["steps"] == 50 and "guidance" not in row
    ]
    summary = {
        "samples": args.samples,
        "rows": rows,
        "dit_digits_fd_seed_spread": {
            "mean": statistics.mean(spread),
            "stdev": statistics.stdev(spread),
            "min": min(spread),
            "max": max(spread),
            "seeds": len(spread),
        },
    }
    RESULTS.write_text(json.dumps(summary, indent=2))
    DOC.write_text(to_markdown(summary))
    print(f"wrote {RESULTS} and {DOC}")


def measure(what: str, images: torch.Tensor, labels: torch.Tensor | None, **extra) -> dict:
    row = {
        "what": what,
        "fd": digits_fd(images),
        "accuracy": class_accuracy(images, labels) if labels is not None else None,
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def model_rows(name: str, samples: int, seeds: int) -> list[dict]:
    """50 and 10 steps (grid from the 50-step samples); for dit-digits also more seeds and guidance."""
    rows = []
    for steps in (50, 10):
        started = time.perf_counter()
        images, labels = generate(name, steps, samples, seed=0)
        rows.append(
            measure(
                f"{name}, {steps} steps",
                images,
                labels,
                model=name,
                steps=steps,
                seed=0,
                seconds=time.perf_counter() - started,
            )
        )
        if steps == 50:
            save_grid(images[:100], Path("docs/images") / f"{name}.png")
    if name == "dit-digits":
        for seed in range(1, seeds):
            images, labels = generate(name, 50, samples, seed=seed)
            rows.append(measure(f"{name}, 50 steps", images, labels, model=name, steps=50, seed=seed))
        images, labels = generate(name, 50, samples, seed=0, guidance=3.0)
        rows.append(measure(f"{name}, 50 steps, guidance 3", images, labels, model=name, steps=50, guidance=3.0))
    return rows


def to_markdown(summary: dict) -> str:
    spread = summary["dit_digits_fd_seed_spread"]
    floor = summary["rows"][0]["fd"]
    lines = [
        "# Quality metrics and their dynamic range",
        "",
        "Produced by `python scripts/evaluate_reference.py` (results: "
        "`benchmarks/results/reference_quality.json`). Each row samples "
        f"{summary['samples']} class-conditional digits (equal counts per class) with DDIM "
        "(trailing spacing, x0 clipped to [-1, 1]) for the DDPM models and Euler for the flow model.",
        "",
        "- **digits FD**: Fréchet distance between the shipped classifier's 64-d penultimate features of the "
        "samples and of the 1,197 real training digits. Lower is better.",
        "- **accuracy**: how often the classifier (97% on held-out real digits) reads the requested class.",
        "",
        "| what | digits FD | FD / real floor | accuracy |",
        "|---|---|---|---|",
    ]
    for row in summary["rows"]:
        accuracy = "" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(
            f"| {row['what']}{'' if row.get('seed', 0) == 0 else ' (seed ' + str(row['seed']) + ')'} "
            f"| {row['fd']:.2f} | {row['fd'] / floor:.1f}x | {accuracy} |"
        )
    lines += [
        "",
        f"**Seed-to-seed spread** of digits FD (dit-digits, 50 steps, {spread['seeds']} seeds of "
        f"{summary['samples']} samples): mean {spread['mean']:.2f}, standard deviation {spread['stdev']:.2f}, "
        f"range {spread['min']:.2f} to {spread['max']:.2f}. Differences smaller than about two standard "
        "deviations are noise. Paired fidelity against the exact sampler from the same noise (PSNR, "
        "relative L2, predicted-label agreement; `diffopt.measure.fidelity`, `label_agreement`) is therefore "
        "the primary signal for lossy passes; FD and accuracy are distribution checks. Guidance shows why "
        "both are reported: it raises accuracy while FD gets worse.",
        "",
        "Sample grids (first 100 samples, columns = classes 0-9): "
        + ", ".join(f"[{name}](images/{name}.png)" for name in ("dit-digits", "unet-digits", "dit-digits-flow")),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
