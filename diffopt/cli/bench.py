"""``diffopt bench``: a set of configurations measured in one run (zoo models or pipelines)."""

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
    """The ``bench`` command and its options."""
    parser = commands.add_parser(
        "bench", help="run configurations (passes x backends x step counts, baselines) on a model in one run"
    )
    parser.add_argument("config", help="bench file, e.g. benchmarks/configs/caching_dit-digits.json")
    add_sources(parser, None)
    parser.add_argument("--out", type=output_file, required=True, help="results stem: writes .json, .md, .png")
    parser.add_argument("--samples", type=bounded(int, 10, "--samples"), default=600)
    parser.add_argument("--timing-batch", type=bounded(int, 1, "--timing-batch"), default=50)
    parser.add_argument("--repeats", type=bounded(int, 1, "--repeats"), default=3)
    parser.add_argument("--timing-only", action="store_true", help="wall time only, no quality runs")
    parser.add_argument(
        "--reference-seeds",
        type=bounded(int, 1, "--reference-seeds"),
        default=3,
        help="noise seeds of the reference's FD (its seed noise)",
    )
    parser.add_argument("--only", nargs="+", help="run only these configurations (and the first, the reference)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """One bench for every source: the bench file's configurations on a zoo model's digits
    or a pipeline's calls (``measure.tuning.bench``), written as JSON, markdown and a plot."""
    from diffopt.evaluation.bench import run_bench, write_results
    from diffopt.measure.tuning import bench
    from diffopt.measure.workload import Configuration
    from diffopt.pipelines.tuning import pipeline_workload

    model, title, configurations = bench_file(args.config)
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in configurations})
        if unknown:
            raise UsageError(f"--only names no configuration of {args.config}: {unknown}")
        configurations = [c for i, c in enumerate(configurations) if i == 0 or c.name in args.only]
    if configurations[0].passes is not None or configurations[0].baseline is not None:
        configurations.insert(0, Configuration("unmodified"))  # the reference is the plain model
    command = f"diffopt bench {args.config} --out {args.out} --repeats {args.repeats}"
    if args.pipeline or args.factory:
        kind, source = source_of(args)
        if kind != "pipeline":
            raise UsageError("bench --model runs pipeline calls: the factory must return a diffusers pipeline")
        summary = bench(pipeline_workload(source, pipeline_calls(args, source)), configurations, repeats=args.repeats)
        command += (
            (f" --pipeline {args.pipeline}" if args.pipeline else f" --model {args.factory}")
            + (f" --calls {args.calls}" if args.calls else "")
            + (f" --steps {args.steps}" if args.steps is not None else "")
        )
    else:
        if model is None:
            raise UsageError(f'{args.config} names no reference model: add "model" or give --pipeline DIR / --model')
        summary = run_bench(
            model,
            configurations,
            samples=args.samples,
            timing_batch=args.timing_batch,
            repeats=args.repeats,
            timing_only=args.timing_only,
            reference_seeds=args.reference_seeds,
        )
        command += (
            f" --samples {args.samples} --timing-batch {args.timing_batch} --reference-seeds {args.reference_seeds}"
            + (" --timing-only" if args.timing_only else "")
        )
    command += (" --only " + " ".join(f'"{name}"' for name in args.only) if args.only else "") + plugin_options()
    write_results({**summary, "plugins": loaded_plugins()}, args.out, title, command)
    skipped = f"; skipped: {summary['skipped']}" if summary["skipped"] else ""
    print(f"wrote {args.out}.json, .md" + ("" if args.timing_only else ", .png") + skipped)
