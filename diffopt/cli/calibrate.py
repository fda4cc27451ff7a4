"""``diffopt calibrate``: temporal statistics of a reference model."""

from __future__ import annotations

import argparse

from diffopt.cli.common import bounded, digits_run, output_file


def add_parser(commands) -> None:
    """The ``calibrate`` command and its options."""
    parser = commands.add_parser(
        "calibrate",
        help="temporal calibration: how much linear-op inputs change between steps (Ditto statistics, static scales)",
    )
    parser.add_argument("model", help="reference model name")
    parser.add_argument("--out", type=output_file, default="calibration.json")
    parser.add_argument("--samples", type=bounded(int, 1, "--samples"), default=8, help="samples per run")
    parser.add_argument(
        "--steps",
        type=bounded(int, 2, "--steps"),
        default=50,
        help="sampling steps (>= 2: statistics compare consecutive steps)",
    )
    parser.add_argument(
        "--seeds", type=bounded(int, 0, "--seeds"), nargs="+", default=[0], help="one calibration run per seed"
    )
    parser.add_argument("--layers", action="store_true", help="one line per layer")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from diffopt.measure.calibration import calibrate

    program, sampler, conditions, shape = digits_run(args)
    statistics = calibrate(program, sampler, conditions, shape, seeds=tuple(args.seeds))
    statistics.save(args.out)
    print(statistics.temporal.report(per_layer=args.layers))
    print(
        f"\ncalibration of {args.model} ({args.samples} samples x {len(args.seeds)} runs, {args.steps} DDIM steps) "
        f"written to {args.out}"
    )
