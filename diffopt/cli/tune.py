"""``diffopt tune``: the cheapest configuration over a floor, or the best within a budget."""

from __future__ import annotations

import argparse

from diffopt.cli.common import (
    UsageError,
    add_sources,
    bench_file,
    bounded,
    output_file,
    pipeline_calls,
    plugin_options,
    source_of,
)
from diffopt.util.plugins import loaded_plugins


def add_parser(commands) -> None:
    """The ``tune`` command and its options."""
    parser = commands.add_parser(
        "tune", help="the cheapest configuration over a PSNR floor, or the best within a MAC budget, validated"
    )
    add_sources(parser, "reference model name (dit-digits, unet-digits)")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--min-psnr", type=bounded(float, 0.0, "--min-psnr"), help="the quality floor (dB)")
    goal.add_argument("--budget", type=float, help="the most MACs, as a fraction of the plain run's (plan refined)")
    parser.add_argument("--cost", choices=("macs", "time"), default="macs")
    parser.add_argument("--samples", type=bounded(int, 10, "--samples"), default=100, help="calibration samples")
    parser.add_argument("--validation-samples", type=bounded(int, 10, "--validation-samples"), default=200)
    parser.add_argument("--candidates", help="bench file of candidates (default: a built-in search space)")
    parser.add_argument("--out", type=output_file, default="tune", help="results stem: .json, .png, .passes.json")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from diffopt.evaluation.workload import DigitsWorkload
    from diffopt.measure.search import format_summary, save
    from diffopt.measure.tuning import tune
    from diffopt.pipelines.tuning import pipeline_workload

    kind, source = source_of(args)
    options = " ".join(
        f"--{name.replace('_', '-')} {value}"
        for name, value in vars(args).items()
        if name in ("pipeline", "factory", "calls", "steps", "min_psnr", "budget", "cost", "candidates", "out")
        and value is not None
    )
    try:
        candidates = bench_file(args.candidates)[2] if args.candidates else None
        if kind == "pipeline":
            workload = pipeline_workload(source, pipeline_calls(args, source))
        elif kind == "zoo":
            workload = DigitsWorkload(source, samples=args.samples, validation_samples=args.validation_samples)
            options += f" --samples {args.samples} --validation-samples {args.validation_samples}"
        else:
            raise UsageError("tune scores whole sampling runs: give a pipeline (--pipeline, or a factory making one)")
        summary = tune(workload, args.min_psnr, budget=args.budget, cost=args.cost, candidates=candidates)
    except ValueError as error:  # nothing meets the floor, or nothing validates
        raise UsageError(str(error)) from None
    summary["command"] = f"diffopt tune {args.model or ''} {options}{plugin_options()}".replace("  ", " ")
    summary["plugins"] = loaded_plugins()
    passes = save(summary, args.out)
    print(format_summary(summary))
    print(f"wrote {args.out}.json, {args.out}.png and the chosen passes to {passes}")
