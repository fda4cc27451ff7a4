"""Edge CPU: dit-digits bundles in fp32, bf16 and int8 on onnxruntime and OpenVINO against the diffusers model.

    python benchmarks/edge_cpu.py     # writes benchmarks/results/edge_cpu.{json,md}
    python benchmarks/edge_cpu.py --model unet-digits --batch-sizes 1   # edge_cpu_unet-digits.{json,md}

Programs: no passes, the strongest forecast cache over the block span (order 2, period 4,
warm-up 2) and dit-digits' tune pick at a quarter of the MACs (its pass file). Each is
exported in fp32 (loaded on onnxruntime, OpenVINO f32 and OpenVINO bf16: a bf16 bundle's files
are the fp32 ones, its manifest asks OpenVINO for bfloat16 inference precision), in
int8-dynamic (``to_onnx(precision="int8-dynamic")``, loaded on onnxruntime and OpenVINO) and in
int8-static (the program plus ``StaticQuantizationPass(weight_form="qdq", float_ends=True)``
with calibration statistics of the plain model on other noise and labels than the quality
run's; Q/DQ graphs, loaded on onnxruntime, on OpenVINO f32 and on OpenVINO with the bf16 hint,
which keeps the int8 products integer and runs the rest in bfloat16).
Baselines: the diffusers model in torch eager fp32 (the speed-ups'
denominator) and under bf16 autocast.

Time: a 50-step DDIM run at batch 1 and at batch 32, every runner interleaved
(``measure.timing``), one warm-up round, medians, ``--threads`` threads. Quality, per run
(not per step): PSNR of ``--samples`` samples against the plain 50-step fp32 samples from
the same noise, digits FD and classifier accuracy; the plain model's FD on two other seeds
gives the teacher's seed noise. Run it on a quiet machine: OpenVINO's pinned threads slow
down several-fold when another process shares the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from common import DIGIT_SHAPE, Bf16Autocast, generate, run_metadata, scheduler, time_runs

from diffopt import Sampler, capture, optimize
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd
from diffopt.export import to_onnx
from diffopt.measure.calibration import calibrate
from diffopt.measure.fidelity import psnr
from diffopt.models import example_inputs, load
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.passes.registry import load_passes
from diffopt.passes.static_quantization import StaticQuantizationPass
from diffopt.runtime.runtimes import load_bundle

RESULTS = Path("benchmarks/results")
STEPS = 50
TUNE_PICKS = RESULTS / "caching_pareto"  # <model>_0.25.passes.json: tune's pick at a quarter of the MACs
RUNTIMES = {  # runner name -> (bundle precision, runtime, its options)
    "onnxruntime fp32": ("fp32", "onnxruntime", {}),
    "OpenVINO f32": ("fp32", "openvino", {"precision": "f32"}),
    "OpenVINO bf16": ("fp32", "openvino", {"precision": "bf16"}),
    "onnxruntime int8-dynamic": ("int8-dynamic", "onnxruntime", {}),
    "OpenVINO int8-dynamic": ("int8-dynamic", "openvino", {}),
    "onnxruntime int8-static": ("int8-static", "onnxruntime", {}),
    "OpenVINO int8-static": ("int8-static", "openvino", {"precision": "f32"}),
    "OpenVINO int8-static, bf16 hint": ("int8-static", "openvino", {"precision": "bf16"}),
}
INT8_STATIC = StaticQuantizationPass(weight_form="qdq", float_ends=True)
CALIBRATION_SAMPLES, CALIBRATION_SEED = 64, 7


def programs(model_name: str) -> dict[str, tuple[list, int]]:
    """Program name -> (passes, steps); the block-span forecast cache for the DiT only (a UNet has no span)."""
    pick, fields = load_passes(TUNE_PICKS / f"{model_name}_0.25.passes.json")
    span = {"forecast span o2 p4 w2": ([ForecastCachePass(order=2, period=4, warmup=2, targets="blocks")], STEPS)}
    return {
        "no passes": ([], STEPS),
        **(span if model_name == "dit-digits" else {}),
        "tune pick <= 0.25 MACs": (pick, fields["steps"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dit-digits", choices=("dit-digits", "unet-digits"))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, config = load(args.model)
    graph = capture(model, example_inputs(args.model))
    runners = {
        "diffusers model, torch eager fp32": (model, STEPS),
        "diffusers model, bf16 autocast": (Bf16Autocast(model), STEPS),
    }
    calibration = calibrate(
        optimize(graph).program,
        Sampler(scheduler(config, STEPS), progress=False),
        (torch.arange(CALIBRATION_SAMPLES) % 10,),
        (CALIBRATION_SAMPLES, *DIGIT_SHAPE),
        seeds=(CALIBRATION_SEED,),
        progress=False,
    )
    with tempfile.TemporaryDirectory() as workdir:
        for name, (passes, steps) in programs(args.model).items():
            for precision in dict.fromkeys(precision for precision, _, _ in RUNTIMES.values()):
                static = precision == "int8-static"
                optimized = optimize(graph, [*passes, INT8_STATIC] if static else passes, calibration=calibration)
                directory = Path(workdir) / f"{name}_{precision}".replace(" ", "_")
                to_onnx(optimized, directory, scheduler_config=config, precision=precision)
            for runtime_name, (precision, runtime, options) in RUNTIMES.items():
                directory = Path(workdir) / f"{name}_{precision}".replace(" ", "_")
                denoiser = load_bundle(directory, runtime, threads=args.threads, **options)
                runners[f"{name}, {runtime_name}"] = (denoiser, steps)
        reference = generate(model, config, STEPS, args.samples, seed=0)
        noise_band = [digits_fd(generate(model, config, STEPS, args.samples, seed=s)) for s in (1, 2)]
        labels = torch.arange(args.samples) % 10
        rows = {}
        for name, (denoiser, steps) in runners.items():
            images = generate(denoiser, config, steps, args.samples, seed=0)
            rows[name] = {
                "name": name,
                "steps": steps,
                "psnr": psnr(images, reference),
                "fd": digits_fd(images),
                "accuracy": class_accuracy(images, labels),
            }
            print(json.dumps(rows[name]), flush=True)
        for batch in args.batch_sizes:
            times = time_runs(runners, config, batch, args.repeats)
            baseline = statistics.median(times["diffusers model, torch eager fp32"])
            for name, seconds in times.items():
                rows[name][f"batch {batch} s"] = statistics.median(seconds)
                rows[name][f"batch {batch} speed-up"] = baseline / statistics.median(seconds)
            print(f"batch {batch} timed", flush=True)
    summary = {
        **run_metadata("edge_cpu.py", args),
        "cpu_count": os.cpu_count(),
        "teacher_fd_seed_noise": noise_band,
        "rows": list(rows.values()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("edge_cpu" if args.model == "dit-digits" else f"edge_cpu_{args.model}")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    stem.with_suffix(".md").write_text(markdown(summary, args.batch_sizes))
    print(markdown(summary, args.batch_sizes))


def markdown(summary: dict, batch_sizes: list[int]) -> str:
    headers = ["runner", "steps", "PSNR vs plain (dB)", "FD", "accuracy"]
    headers += [f"batch {b}: s / speed-up" for b in batch_sizes]
    lines = [
        f"# Edge CPU: {summary['model']} on onnxruntime and OpenVINO",
        "",
        f"`{summary['command']}`",
        "",
        f"{summary['samples']} samples per row for quality (PSNR against the plain 50-step fp32 samples from the same "
        f"noise); times: 50-step DDIM runs, interleaved, median of {summary['repeats']} after a warm-up round, "
        f"{summary['threads']} threads, torch {summary['torch']}. The teacher's FD on two other seeds: "
        f"{', '.join(f'{v:.2f}' for v in summary['teacher_fd_seed_noise'])}. Speed-ups are against the diffusers "
        f"model in torch eager fp32, measured in the same run. int8-dynamic: onnxruntime's dynamic quantization of "
        f"every matrix product but the first and last (int8 weights per channel, activations at run time). "
        f"int8-static: Q/DQ graphs of the same layers with calibrated activation scales.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for row in summary["rows"]:
        cells = [row["name"], str(row["steps"]), f"{row['psnr']:.2f}", f"{row['fd']:.2f}", f"{row['accuracy']:.3f}"]
        cells += [f"{row[f'batch {b} s']:.3f} / {row[f'batch {b} speed-up']:.2f}x" for b in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
