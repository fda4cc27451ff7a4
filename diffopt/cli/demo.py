"""``diffopt demo``: a shipped denoiser optimized, exported, sampled and compared with the plain one."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from diffopt.capture import capture
from diffopt.cli.common import bounded, format_table, load_model, output_file
from diffopt.measure.timing import interleaved_times


def add_parser(commands) -> None:
    """The ``demo`` command and its options."""
    parser = commands.add_parser("demo", help="optimize a shipped denoiser, sample, compare before/after")
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--steps", type=bounded(int, 1, "--steps"), default=50)
    parser.add_argument("--samples", type=bounded(int, 1, "--samples"), default=20)
    parser.add_argument("--guidance", type=bounded(float, 0.0, "--guidance"), default=1.0)
    parser.add_argument("--seed", type=bounded(int, 0, "--seed"), default=0)
    parser.add_argument("--repeats", type=bounded(int, 1, "--repeats"), default=3, help="timed runs per row")
    parser.add_argument("--out", type=output_file, default="demo.png", help="PNG grid: plain (top) vs optimized")
    parser.set_defaults(run=run)


# the strongest stack measured on dit-digits: forecasting the whole block span (order 1, period 4, 5 warm-up
# steps) is the fastest configuration over 45 dB in benchmarks/results/forecast_dit-digits.md (49.5 dB, 0.32 of
# the MACs) and in a DiTPipeline (benchmarks/results/pipelines.md); exported, it runs on onnxruntime
DEMO_FORECAST = {"order": 1, "period": 4, "warmup": 5, "targets": "blocks"}


def run(args: argparse.Namespace) -> None:
    import statistics
    import tempfile

    from diffopt.evaluation.metrics.grid import save_grid
    from diffopt.measure.fidelity import psnr
    from diffopt.models.zoo import NULL_CLASS
    from diffopt.optimize import optimize
    from diffopt.passes.forecast_cache import ForecastCachePass
    from diffopt.sampling.schedulers import make_scheduler
    from diffopt.sampling.sequential import Sampler

    model, inputs, scheduler_config = load_model(args.model, require_weights=True)
    forecast = "forecast cache (block span, o1 p4 w5)"
    runners = {"plain model, torch eager fp32": model}
    runners[f"{forecast}, torch"] = optimize(capture(model, inputs), [ForecastCachePass(**DEMO_FORECAST)])
    with tempfile.TemporaryDirectory() as directory:
        try:
            from diffopt.export import to_onnx
            from diffopt.runtime.runtimes import load_bundle

            print("exporting the forecast program to an ONNX bundle ...", flush=True)
            to_onnx(runners[f"{forecast}, torch"], Path(directory) / "bundle", scheduler_config=scheduler_config)
            runners[f"{forecast}, exported, onnxruntime"] = load_bundle(Path(directory) / "bundle")
        except ImportError as error:
            print(f"(no onnxruntime row: {error}; pip install -e '.[onnx]')")
        labels = torch.arange(args.samples) % 10
        shape = (args.samples, *inputs[0].shape[1:])
        sampler = Sampler(
            make_scheduler(scheduler_config, num_steps=args.steps),
            progress=False,
            guidance_scale=args.guidance,
            null_conditions=(torch.tensor(NULL_CLASS),),
        )
        print(
            f"{args.model}: {args.samples} samples, {args.steps} DDIM steps, guidance {args.guidance}; "
            f"{args.repeats} interleaved timed runs per row after a warm-up run, measured now on this machine "
            f"({torch.get_num_threads()} threads)",
            flush=True,
        )
        samples = {}

        def timed(name: str, denoiser) -> Callable[[int], None]:
            def run(_: int) -> None:
                samples[name] = sampler.sample(denoiser, (labels,), shape=shape, seed=args.seed)

            return run

        times = interleaved_times({name: timed(name, d) for name, d in runners.items()}, args.repeats)
    baseline_name = next(iter(runners))
    baseline = statistics.median(times[baseline_name])
    rows = [
        (
            name,
            f"{statistics.median(seconds):.3f}",
            f"{baseline / statistics.median(seconds):.2f}x",
            f"{psnr(samples[name], samples[baseline_name]):.1f}",
        )
        for name, seconds in times.items()
    ]
    print(format_table(["runner", "median s", "speed-up", "PSNR vs plain (dB)"], rows))
    best = list(runners)[-1]
    save_grid(torch.cat([samples[baseline_name][:10], samples[best][:10]]), args.out, columns=min(10, args.samples))
    print(
        f"\n{args.out}: the plain model's samples (top) and {best}'s (bottom), from the same noise.\n"
        "Every number above was measured just now; the committed measurements (more samples, FD, "
        "accuracy) are in benchmarks/results/forecast_dit-digits.md, pipelines.md and runtime_comparison.md."
    )
