"""torch vs onnxruntime on CPU, for the unoptimized dit-digits, each caching pass and Ditto.

    python benchmarks/runtime_comparison.py      # writes benchmarks/results/runtime_comparison.{json,md}

For each configuration the program is exported to an ONNX bundle and loaded back with
``load_bundle`` (onnxruntime CPU, IOBinding, spinning off). Measured, at each batch size:
- per step: one call of each variant, median of ``--step-repeats`` calls after warm-up;
- per run: a 50-step DDIM sampling run, all runners interleaved (A B C A B C ...),
  ``--repeats`` rounds after a warm-up round, median;
- agreement: relative L2 between the onnxruntime and torch samples of the same
  configuration from the same noise (float noise, except for quantized modes: a rounding
  difference upstream of a quantizer flips a code now and then).
Runners: the plain diffusers model in torch eager fp32 (the baseline users have), the
same in torch eager with bf16 autocast (faster matmuls, lossy: its PSNR is reported),
diffopt's program run by torch (fx graphs), and the exported bundle on onnxruntime.
Static quantization scales (Ditto's difference mode) come from one 50-sample temporal
calibration run on a seed the timed runs do not use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import Bf16Autocast

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.export import to_onnx
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.measure.calibration import calibrate
from diffopt.measure.fidelity import psnr, relative_l2
from diffopt.measure.timing import interleaved_times, median_times
from diffopt.models import example_inputs, load
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.passes.temporal_difference import TemporalDifferencePass
from diffopt.runtime.runtimes import load_bundle

RESULTS = Path("benchmarks/results")
MIDDLE_BLOCKS = tuple(f"transformer_blocks.{i}" for i in range(1, 5))
CONFIGURATIONS = {
    "no passes": [],
    "ICC svd r16 p3": [IncrementCalibratedCachePass(rank=16, period=3)],
    "block reuse 1-4 p2": [BlockCachePass(blocks=MIDDLE_BLOCKS, period=2)],
    "first-block cache 0.1": [FirstBlockCachePass(0.1)],
    "Ditto exact": [TemporalDifferencePass("exact")],
    "Ditto dynamic int8": [TemporalDifferencePass("dynamic")],  # onnxruntime: MatMulIntegerToFloat
    "Ditto difference int8 (static scales)": [TemporalDifferencePass("difference")],  # Q/DQ, float matmuls
}
CALIBRATION_SAMPLES = 50  # temporal calibration (static scales): one 50-step run, seed 1000


def median_call_seconds(function, repeats: int) -> float:
    return median_times({"call": lambda _: function()}, repeats)["call"]


def needs_calibration(passes) -> bool:
    return any(getattr(p, "needs_calibration", False) for p in passes)


def temporal_calibration(graph, config) -> CalibrationStatistics:
    sampler = Sampler(make_scheduler(config, "ddim", 50), progress=False)
    return calibrate(
        optimize(graph).program,
        sampler,
        (torch.arange(CALIBRATION_SAMPLES) % 10,),
        (CALIBRATION_SAMPLES, 1, 16, 16),
        seeds=(1000,),
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-repeats", type=int, default=20)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model, config = load("dit-digits")
    graph = capture(model, example_inputs("dit-digits"))
    calibration = temporal_calibration(graph, config) if any(map(needs_calibration, CONFIGURATIONS.values())) else None
    runners, agreement_pairs, per_step, export_seconds = {}, [], [], {}
    workdir = Path(tempfile.mkdtemp(prefix="diffopt-bench-"))
    runners["torch eager fp32 (diffusers model)"] = model
    runners["torch eager bf16 autocast (diffusers model)"] = Bf16Autocast(model)
    for name, passes in CONFIGURATIONS.items():
        optimized = optimize(graph, passes, calibration=calibration if needs_calibration(passes) else None)
        started = time.perf_counter()
        to_onnx(optimized, workdir / name.replace(" ", "_"))
        export_seconds[name] = time.perf_counter() - started
        exported = load_bundle(workdir / name.replace(" ", "_"), threads=threads)
        runners[f"{name}: torch (diffopt graphs)"] = optimized
        runners[f"{name}: onnxruntime"] = exported
        agreement_pairs.append((name, f"{name}: torch (diffopt graphs)", f"{name}: onnxruntime"))
        for batch in args.batch_sizes:
            inputs = (torch.randn(batch, 1, 16, 16), torch.full((batch,), 500), torch.arange(batch) % 10)
            for variant in optimized.program.variants:
                state = optimized.init_state(batch)
                for backend_name, backend in (("torch", optimized.backend), ("onnxruntime", exported.backend)):
                    seconds = median_call_seconds(lambda: backend.run(variant, (*inputs, *state)), args.step_repeats)
                    per_step.append(
                        {
                            "configuration": name,
                            "variant": variant,
                            "backend": backend_name,
                            "batch": batch,
                            "median_s": seconds,
                        }
                    )
                    print(json.dumps(per_step[-1]), flush=True)
    per_run = []
    for batch in args.batch_sizes:
        labels = torch.arange(batch) % 10
        sampler = Sampler(make_scheduler(config, "ddim", args.steps), progress=False)
        samples = {}

        def timed(name, runner, labels=labels, sampler=sampler, batch=batch):
            def run(repeat):
                samples[name] = sampler.sample(runner, (labels,), shape=(batch, 1, 16, 16), seed=repeat)

            return run

        times = interleaved_times({name: timed(name, runner) for name, runner in runners.items()}, args.repeats)
        baseline = statistics.median(times["torch eager fp32 (diffusers model)"])
        reference = samples["torch eager fp32 (diffusers model)"]
        for name in runners:
            row = {
                "runner": name,
                "batch": batch,
                "median_s": statistics.median(times[name]),
                "all_s": times[name],
                "speedup_vs_torch_eager_fp32": baseline / statistics.median(times[name]),
                "psnr_vs_torch_eager_fp32": psnr(samples[name], reference),
            }
            per_run.append(row)
            print(json.dumps(row), flush=True)
        for configuration, torch_name, ort_name in agreement_pairs:
            per_run.append(
                {
                    "agreement": configuration,
                    "batch": batch,
                    "rel_l2_onnxruntime_vs_torch": relative_l2(samples[ort_name], samples[torch_name]),
                }
            )
    summary = {
        "model": "dit-digits",
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "machine": platform.processor() or platform.machine(),
        "export_s": export_seconds,
        "command": f"python benchmarks/runtime_comparison.py --batch-sizes {' '.join(map(str, args.batch_sizes))} "
        f"--steps {args.steps} --repeats {args.repeats} --step-repeats {args.step_repeats}",
        "per_step": per_step,
        "per_run": per_run,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime_comparison.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / "runtime_comparison.md").write_text(to_markdown(summary))
    print(f"wrote {RESULTS}/runtime_comparison.json and .md")


def to_markdown(summary: dict) -> str:
    lines = [
        "# torch vs onnxruntime on CPU (dit-digits)",
        "",
        f"`{summary['command']}`: torch {summary['torch']}, onnxruntime {summary['onnxruntime']}, "
        f"{summary['threads']} threads. Per run: {summary['steps']}-step DDIM, median of {summary['repeats']} "
        "interleaved runs.",
        "",
        "## Per sampling run",
        "",
        "| runner | batch | median s | speedup vs torch eager fp32 | PSNR vs torch eager fp32 (dB) |",
        "|---|---|---|---|---|",
    ]
    for row in summary["per_run"]:
        if "runner" in row:
            lines.append(
                f"| {row['runner']} | {row['batch']} | {row['median_s']:.3f} | "
                f"{row['speedup_vs_torch_eager_fp32']:.2f}x | {row['psnr_vs_torch_eager_fp32']:.1f} |"
            )
    lines += [
        "",
        "onnxruntime vs torch, same configuration and noise (relative L2 of the samples): "
        + ", ".join(
            f"{row['agreement']} (batch {row['batch']}) {row['rel_l2_onnxruntime_vs_torch']:.1e}"
            for row in summary["per_run"]
            if "agreement" in row
        ),
        "",
        "## Per step (one variant call)",
        "",
        "| configuration | variant | batch | torch ms | onnxruntime ms |",
        "|---|---|---|---|---|",
    ]
    steps = {}
    for row in summary["per_step"]:
        steps.setdefault((row["configuration"], row["variant"], row["batch"]), {})[row["backend"]] = row["median_s"]
    for (configuration, variant, batch), seconds in steps.items():
        lines.append(
            f"| {configuration} | {variant} | {batch} | {1000 * seconds['torch']:.2f} | "
            f"{1000 * seconds['onnxruntime']:.2f} |"
        )
    lines.append("\nExport time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["export_s"].items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
