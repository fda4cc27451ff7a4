"""``diffopt report``: a temporal-difference program's per-layer decisions and cost per run."""

from __future__ import annotations

import argparse

from diffopt.cli.common import bounded, digits_run, format_table
from diffopt.passes.temporal_difference import MODES


def add_parser(commands) -> None:
    """The ``report`` command and its options."""
    parser = commands.add_parser(
        "report",
        help="temporal-difference program: each layer's mode and why, and "
        "the cost per run (MACs, bit-operations, state, peak memory)",
    )
    parser.add_argument("model", help="reference model name")
    parser.add_argument("--calibration", help="from `diffopt calibrate` (needed by every mode but exact)")
    parser.add_argument("--mode", choices=MODES, default="exact")
    parser.add_argument("--bits", type=bounded(int, 2, "--bits"), default=8)
    parser.add_argument("--row-threshold", type=bounded(float, 0.0, "--row-threshold"), default=None)
    parser.add_argument("--defo", choices=("model", "measured"), help="decide full/delta per layer (Defo)")
    parser.add_argument("--samples", type=bounded(int, 1, "--samples"), default=4, help="batch of the costed run")
    parser.add_argument("--steps", type=bounded(int, 2, "--steps"), default=50)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from diffopt.ir.statistics import CalibrationStatistics
    from diffopt.measure.cost import measure_run_cost
    from diffopt.measure.defo_profile import profile_layers
    from diffopt.optimize import optimize
    from diffopt.passes.defo import DefoPass
    from diffopt.passes.temporal_difference import TemporalDifferencePass, layer_decisions

    program, sampler, conditions, shape = digits_run(args)
    calibration = CalibrationStatistics.load(args.calibration) if args.calibration else None
    difference = TemporalDifferencePass(args.mode, bits=args.bits, row_threshold=args.row_threshold)
    passes = [difference]
    if args.defo:
        print(f"profiling every layer group in full and delta form at batch {args.samples} ...")
        profile = profile_layers(program, difference, sampler, conditions, shape, calibration=calibration)
        passes = [DefoPass(profile, difference, cost=args.defo)]
        print(f"cost model agrees with the measured latencies on {profile.agreement():.0%} of layers")
    optimized = optimize(program, passes, calibration=calibration).program
    rows = [(layer, mode, reason or "") for layer, (mode, reason) in layer_decisions(optimized).items()]
    print(format_table(["layer", "mode", "reason"], rows))
    costs = {
        "unoptimized": measure_run_cost(program, sampler, conditions, shape),
        str(difference): measure_run_cost(optimized, sampler, conditions, shape),
    }
    print(f"\ncost per sampling run ({args.steps} DDIM steps, batch {args.samples}):")
    print(
        format_table(
            ["program", "GMACs", "linear G-bit-ops", "state MB", "peak activations MB"],
            [
                (
                    name,
                    f"{c.macs / 1e9:.2f}",
                    f"{c.linear_bit_operations / 1e9:.0f}",
                    f"{c.state_bytes / 1e6:.2f}",
                    f"{c.peak_activation_bytes / 1e6:.2f}",
                )
                for name, c in costs.items()
            ],
        )
    )
