"""``diffopt demo``: the bench file ``demo.json`` (the plain model, a forecast cache in torch
and exported to onnxruntime) measured now on this machine, and an image grid of the plain
model's samples above the last configuration's, from the same noise."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from diffopt.cli.common import bench_file, bounded, format_table, output_file

DEMO_BENCH = Path(__file__).with_name("demo.json")
# why this cache: forecasting the whole block span (order 1, period 4, 5 warm-up steps) is the fastest
# configuration over 45 dB in benchmarks/results/forecast_dit-digits.md (49.5 dB, 0.32 of the MACs) and in a
# DiTPipeline (benchmarks/results/pipelines.md); exported, it runs on onnxruntime


def add_parser(commands) -> None:
    """The ``demo`` command and its options."""
    parser = commands.add_parser("demo", help="optimize a shipped denoiser, sample, compare before/after")
    parser.add_argument("--model", help="a shipped model (default: the bench file's, dit-digits)")
    parser.add_argument("--steps", type=bounded(int, 1, "--steps"), default=50)
    parser.add_argument("--samples", type=bounded(int, 1, "--samples"), default=20)
    parser.add_argument("--seed", type=bounded(int, 0, "--seed"), default=0)
    parser.add_argument("--repeats", type=bounded(int, 1, "--repeats"), default=3, help="timed runs per row")
    parser.add_argument("--out", type=output_file, default="demo.png", help="PNG grid: plain (top) vs optimized")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from diffopt.evaluation.metrics.grid import save_grid
    from diffopt.evaluation.workload import DigitsWorkload
    from diffopt.measure.tuning import bench

    model, _, configurations = bench_file(DEMO_BENCH)
    configurations = [dataclasses.replace(c, steps=args.steps) for c in configurations]
    workload = DigitsWorkload(args.model or model, samples=args.samples, timing_batch=args.samples, seed=args.seed)
    print(
        f"{workload.name}: {args.samples} samples, {args.steps} steps, {args.repeats} interleaved timed runs per "
        f"row after a warm-up run, measured now on this machine ({torch.get_num_threads()} threads); the rows are "
        f"{DEMO_BENCH.name}'s",
        flush=True,
    )
    summary = bench(workload, configurations, repeats=args.repeats)
    rows = [
        (row["name"], f"{row['wall_s_median']:.3f}", f"{row['speedup']:.2f}x", f"{row['psnr']:.1f}")
        for row in summary["rows"]
    ]
    print(format_table(["runner", "median s", "speed-up", "PSNR vs plain (dB)"], rows))
    plain, best = configurations[0], configurations[-1]
    grid = [workload.run(configuration, "scoring").outputs[:10] for configuration in (plain, best)]
    save_grid(torch.cat(grid), args.out, columns=min(10, args.samples))
    print(
        f"\n{args.out}: the plain model's samples (top) and {best.name}'s (bottom), from the same noise.\n"
        "Every number above was measured just now; the committed measurements (more samples, FD, "
        "accuracy) are in benchmarks/results/forecast_dit-digits.md, pipelines.md and runtime_comparison.md."
    )
