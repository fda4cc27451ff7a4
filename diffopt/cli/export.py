"""``diffopt export``: a model (optionally with passes) to a bundle."""

from __future__ import annotations

import argparse
import time

from diffopt.capture import capture
from diffopt.cli.common import (
    UsageError,
    add_sources,
    bundle_directory,
    load_model,
    pass_file,
    pipeline_calls,
    run_enabled,
    source_of,
)
from diffopt.runtime.bundle import PRECISIONS, PROFILES


def add_parser(commands) -> None:
    """The ``export`` command and its options."""
    parser = commands.add_parser("export", help="export a shipped denoiser (optionally cached) to an ONNX bundle")
    add_sources(parser, "reference model name")
    parser.add_argument("out", type=bundle_directory, help="bundle directory to write")
    parser.add_argument("--passes", metavar="FILE", help="a pass file (what `diffopt tune` writes)")
    parser.add_argument("--profile", choices=PROFILES, default=PROFILES[0])
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=PRECISIONS[0],
        help="bf16: OpenVINO runs the bundle at bfloat16; int8-dynamic: int8 matrix products on onnxruntime",
    )
    parser.add_argument(
        "--temporal-difference",
        choices=("exact", "dynamic", "difference"),
        help="Ditto layers: dynamic = int8 differences on onnxruntime's integer kernels; "
        "difference = static int8 scales (TensorRT profile), needs --calibration",
    )
    parser.add_argument("--calibration", help="from `diffopt calibrate` (for --temporal-difference difference)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from diffopt.export import to_onnx
    from diffopt.ir.statistics import CalibrationStatistics
    from diffopt.optimize import optimize
    from diffopt.passes.temporal_difference import TemporalDifferencePass

    passes, extra = pass_file(args.passes) if args.passes else ([], {})
    if args.temporal_difference:
        passes.append(TemporalDifferencePass(args.temporal_difference))
    calibration = CalibrationStatistics.load(args.calibration) if args.calibration else None
    kind, source = source_of(args)
    started = time.perf_counter()
    if kind == "pipeline":
        from diffopt.pipelines import export as export_pipeline

        if calibration is not None:
            raise UsageError("--calibration is for reference models; a pipeline's passes take none here")
        call = pipeline_calls(args, source)[0]
        if "steps" in extra and args.steps is None:
            call["num_inference_steps"] = extra["steps"]
        run_enabled(source, call, passes)
        manifest = export_pipeline(source, args.out, profile=args.profile, precision=args.precision)
        name = f"the {source.__class__.__name__} denoiser"
    else:
        if kind == "bare":
            model, inputs, scheduler_config = source.model, source.inputs, source.scheduler_config
        else:
            model, inputs, scheduler_config = load_model(source, require_weights=True)
        optimized = optimize(capture(model, inputs), passes, calibration=calibration)
        manifest = to_onnx(
            optimized, args.out, profile=args.profile, scheduler_config=scheduler_config, precision=args.precision
        )
        name = args.model or args.factory
    print(
        f"exported {name} (passes: {', '.join(map(str, passes)) or 'none'}) to {args.out} "
        f"in {time.perf_counter() - started:.1f} s: variants {list(manifest.variants)}, {len(manifest.state)} state "
        f"tensors, profile {manifest.profile}, precision {manifest.precision}"
    )
