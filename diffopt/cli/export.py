"""``diffopt export``: a model (optionally with passes) to a bundle."""

from __future__ import annotations

import argparse
import time

from diffopt.capture import capture
from diffopt.cli.common import (
    UsageError,
    add_sources,
    bounded,
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
        help="bf16: OpenVINO runs the bundle at bfloat16; int8-dynamic: int8 matrix products on onnxruntime; "
        "int8-static: Q/DQ graphs with calibrated scales (OpenVINO, TensorRT), needs --calibration",
    )
    parser.add_argument(
        "--temporal-difference",
        choices=("exact", "dynamic", "difference"),
        help="Ditto layers: dynamic = int8 differences on onnxruntime's integer kernels; "
        "difference = static int8 scales (TensorRT profile), needs --calibration",
    )
    parser.add_argument(
        "--calibration", help="from `diffopt calibrate` (for --temporal-difference difference, --precision int8-static)"
    )
    parser.add_argument(
        "--float-layers",
        type=bounded(int, 0, "--float-layers"),
        default=0,
        help="int8-static: also keep float the N layers whose int8 error, measured one layer at a time, is largest",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from diffopt.export import to_onnx
    from diffopt.ir.statistics import CalibrationStatistics
    from diffopt.optimize import optimize
    from diffopt.passes.static_quantization import INT8_STATIC
    from diffopt.passes.temporal_difference import TemporalDifferencePass

    passes, extra = pass_file(args.passes) if args.passes else ([], {})
    if args.temporal_difference:
        passes.append(TemporalDifferencePass(args.temporal_difference))
    kind, source = source_of(args)
    if args.float_layers and args.precision != "int8-static":
        raise UsageError("--float-layers chooses the float layers of --precision int8-static")
    if args.precision == "int8-static":
        if kind == "pipeline":
            raise UsageError("--precision int8-static is for reference models: use bf16 or int8-dynamic")
        if not args.calibration:
            raise UsageError("--precision int8-static needs --calibration FILE (from `diffopt calibrate`)")
        passes.append(INT8_STATIC)
    calibration = CalibrationStatistics.load(args.calibration) if args.calibration else None
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
        graph = capture(model, inputs)
        policy = _measured_float_policy(graph, inputs, passes[-1], calibration, args.float_layers)
        optimized = optimize(graph, passes, calibration=calibration, policy=policy)
        manifest = to_onnx(
            optimized, args.out, profile=args.profile, scheduler_config=scheduler_config, precision=args.precision
        )
        name = args.model or args.factory
    print(
        f"exported {name} (passes: {', '.join(map(str, passes)) or 'none'}) to {args.out} "
        f"in {time.perf_counter() - started:.1f} s: variants {list(manifest.variants)}, {len(manifest.state)} state "
        f"tensors, profile {manifest.profile}, precision {manifest.precision}"
    )


def _measured_float_policy(graph, inputs, quantization, calibration, count: int):
    """The layer policy keeping float the ``count`` layers with the largest int8 error, each
    measured alone on the model's example inputs at timesteps 900, 500 and 100 (None for 0)."""
    if not count:
        return None
    import torch

    from diffopt.ir.program import StepProgram
    from diffopt.measure.quantization_error import float_policy, int8_layer_errors, largest_errors

    latent, timestep, *conditions = inputs
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    step_inputs = [(noise, torch.full_like(timestep, t), *conditions) for t in (900, 500, 100)]
    errors = int8_layer_errors(StepProgram.from_captured(graph), quantization, calibration, step_inputs)
    kept = largest_errors(errors, count)
    print(f"kept float by measured int8 error: {', '.join(f'{layer} ({errors[layer]:.2%})' for layer in kept)}")
    return float_policy(kept)
