"""Temporal-difference layers (Ditto) benchmark: quality, cost and wall time in one run.

    python benchmarks/temporal_difference.py                      # dit-digits
    python benchmarks/temporal_difference.py --model unet-digits

Writes benchmarks/results/temporal_difference_<model>.{json,md}. Steps:
1. temporal calibration of the fp32 program (``--calibration-samples`` digits, one
   50-step DDIM run per phase); its report (ours beside Ditto's numbers) goes in the results;
2. methods, all on the same trained weights and 50-step DDIM: fp32 (captured graph),
   bf16 autocast (the plain model), static int8 of full activations (A8, float weights)
   and A8W8, and TemporalDifferencePass exact / integer (= A8W8) / difference int8 and
   int4 / + row skipping / + Defo (cost model, profiled at the timing batch);
3. quality: ``--samples`` digits from the same seeded noise as fp32: digits FD,
   accuracy, and paired fidelity vs fp32 (relative L2, PSNR);
4. cost per sample per run (``diffopt.cost``): MACs, linear-layer bit-operations
   (zero codes skipped, code widths counted on the values that ran), state bytes, peak
   activation memory, counted at the timing batch;
5. wall time per run of ``--timing-batch`` samples: every torch method interleaved,
   ``--repeats`` rounds after a warm-up, median; with ``--onnxruntime`` also fp32 and
   exact-mode bundles on onnxruntime CPU (interleaved with each other);
6. Defo: the profile's per-layer measured vs modelled costs, and the agreement of the
   model's decisions with the clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import Bf16Autocast, generate, time_runs

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd
from diffopt.measure.calibration import calibrate
from diffopt.measure.cost import measure_run_cost
from diffopt.measure.defo_profile import profile_layers
from diffopt.measure.fidelity import psnr, relative_l2
from diffopt.models import example_inputs, load
from diffopt.passes.defo import DefoPass
from diffopt.passes.static_quantization import StaticQuantizationPass
from diffopt.passes.temporal_difference import DELTA, TemporalDifferencePass, layer_decisions

RESULTS = Path("benchmarks/results")
STEPS = 50


def configurations(row_thresholds) -> dict[str, list]:
    """name -> passes (a Defo entry names the TemporalDifferencePass it decides for)."""
    configs = {
        "static int8 A8 (float weights)": [StaticQuantizationPass(weight_bits=None)],
        "static int8 A8W8": [StaticQuantizationPass()],
        "Ditto exact": [TemporalDifferencePass("exact")],
        "Ditto integer (= A8W8)": [TemporalDifferencePass("integer")],
        "Ditto difference int8": [TemporalDifferencePass("difference", bits=8)],
        "Ditto difference int4": [TemporalDifferencePass("difference", bits=4)],
    }
    for threshold in row_thresholds:
        configs[f"Ditto difference int8 + rows {threshold:g}"] = [
            TemporalDifferencePass("difference", bits=8, row_threshold=threshold)
        ]
    configs[f"Ditto exact + rows {row_thresholds[-1]:g}"] = [
        TemporalDifferencePass("exact", row_threshold=row_thresholds[-1])
    ]
    configs[f"Defo over difference int8 + rows {row_thresholds[-1]:g}"] = [
        "defo",
        TemporalDifferencePass("difference", bits=8, row_threshold=row_thresholds[-1]),
    ]
    configs["Defo over exact"] = ["defo", TemporalDifferencePass("exact")]
    return configs


def build(graph, passes, calibration, defo_context):
    """(optimized denoiser, Defo profile or None)."""
    if passes and passes[0] == "defo":
        difference = passes[1]
        program, sampler, conditions, shape = defo_context
        profile = profile_layers(program, difference, sampler, conditions, shape, calibration=calibration)
        return optimize(graph, [DefoPass(profile, difference)], calibration=calibration), profile
    return optimize(graph, passes, calibration=calibration), None


def onnxruntime_times(graph, denoisers, config, batch, repeats) -> dict[str, list[float]]:
    """fp32 and exact-mode bundles on onnxruntime, interleaved; also their agreement with torch."""
    from diffopt.export import to_onnx
    from diffopt.runtime.runtimes import load_bundle

    runners, agreement = {}, {}
    labels = torch.arange(4) % 10
    sampler = Sampler(make_scheduler(config, "ddim", STEPS), progress=False)
    for name in ("fp32 (captured graph)", "Ditto exact"):
        directory = tempfile.mkdtemp(prefix="diffopt-ditto-")
        to_onnx(denoisers[name], directory)
        runners[f"onnxruntime {name}"] = (load_bundle(directory), STEPS)
        torch_samples = sampler.sample(denoisers[name], (labels,), shape=(4, 1, 16, 16), seed=3)
        ort_samples = sampler.sample(runners[f"onnxruntime {name}"][0], (labels,), shape=(4, 1, 16, 16), seed=3)
        agreement[f"onnxruntime {name}"] = relative_l2(ort_samples, torch_samples)
    times = time_runs(runners, config, batch, repeats)
    return times, agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-digits", choices=["dit-digits", "unet-digits"])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--timing-batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--row-thresholds", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--onnxruntime", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, config = load(args.model)
    graph = capture(model, example_inputs(args.model))
    fp32 = optimize(graph)
    sampler = Sampler(make_scheduler(config, "ddim", STEPS), progress=False)
    calibration_labels = torch.arange(args.calibration_samples) % 10
    calibration = calibrate(
        fp32.program, sampler, (calibration_labels,), (args.calibration_samples, 1, 16, 16), seeds=(777,)
    )
    print(calibration.temporal.report())
    timing_labels = torch.arange(args.timing_batch) % 10
    timing_shape = (args.timing_batch, 1, 16, 16)
    defo_context = (fp32.program, sampler, (timing_labels,), timing_shape)
    denoisers = {"fp32 (captured graph)": fp32, "bf16 autocast (plain model)": Bf16Autocast(model)}
    profiles, rows = {}, []
    for name, passes in configurations(args.row_thresholds).items():
        denoisers[name], profile = build(graph, passes, calibration, defo_context)
        if profile is not None:
            profiles[name] = profile
    baseline = None
    for name, denoiser in denoisers.items():
        started = time.perf_counter()
        images = generate(denoiser, config, STEPS, args.samples, seed=0)
        baseline = images if baseline is None else baseline
        labels = torch.arange(args.samples) % 10
        row = {
            "method": name,
            "fd": digits_fd(images),
            "accuracy": class_accuracy(images, labels),
            "rel_l2_vs_fp32": relative_l2(images, baseline),
            "psnr_vs_fp32": psnr(images, baseline),
            "quality_run_s": time.perf_counter() - started,
        }
        if hasattr(denoiser, "program"):
            cost = measure_run_cost(denoiser.program, sampler, (timing_labels,), timing_shape, seed=1)
            decisions = layer_decisions(denoiser.program)
            row.update(
                macs_per_sample=cost.macs / args.timing_batch,
                linear_bit_operations_per_sample=cost.linear_bit_operations / args.timing_batch,
                state_bytes=cost.state_bytes,
                peak_activation_bytes=cost.peak_activation_bytes,
                delta_layers=sum(mode == DELTA for mode, _ in decisions.values()),
                layers=len(decisions),
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    times = time_runs(
        {name: (denoiser, STEPS) for name, denoiser in denoisers.items()}, config, args.timing_batch, args.repeats
    )
    agreement = {}
    if args.onnxruntime:
        ort_times, agreement = onnxruntime_times(graph, denoisers, config, args.timing_batch, args.repeats)
        times.update(ort_times)
        rows += [{"method": name} for name in ort_times]
    base_time = statistics.median(times["fp32 (captured graph)"])
    base_cost = rows[0]
    for row in rows:
        row["wall_s_median"] = statistics.median(times[row["method"]])
        row["wall_s_all"] = times[row["method"]]
        row["speedup_vs_fp32"] = base_time / row["wall_s_median"]
        if row["method"] in agreement:
            row["rel_l2_onnxruntime_vs_torch"] = agreement[row["method"]]
        if "macs_per_sample" in row:
            row["mac_fraction"] = row["macs_per_sample"] / base_cost["macs_per_sample"]
            row["bit_operation_fraction"] = (
                row["linear_bit_operations_per_sample"] / base_cost["linear_bit_operations_per_sample"]
            )
    summary = {
        "model": args.model,
        "samples": args.samples,
        "timing_batch": args.timing_batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "command": f"python benchmarks/temporal_difference.py --model {args.model} --samples {args.samples} "
        f"--timing-batch {args.timing_batch} --repeats {args.repeats}",
        "calibration_report": calibration.temporal.report(),
        "defo": {
            name: {
                "agreement": p.agreement(),
                "machine": dataclasses.asdict(p.machine),
                "groups": {g: dataclasses.asdict(c) for g, c in p.groups.items()},
            }
            for name, p in profiles.items()
        },
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"temporal_difference_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    stem.with_suffix(".md").write_text(to_markdown(summary))
    print(f"wrote {stem}.json/.md")


def _format(row: dict, key: str, pattern: str) -> str:
    return format(row[key], pattern) if key in row else "—"


def to_markdown(summary: dict) -> str:
    lines = [
        f"# Temporal-difference layers (Ditto) on {summary['model']}",
        "",
        f"`{summary['command']}` — {summary['samples']} samples per method from the same seeded noise, "
        f"50-step DDIM. Cost per sample per run, counted at batch {summary['timing_batch']}; bit-operations "
        f"of the linear layers (fp32 = 32x32 bits per MAC, zero codes skipped). Wall time: median of "
        f"{summary['repeats']} interleaved runs of {summary['timing_batch']} samples, torch {summary['torch']}, "
        f"{summary['threads']} CPU threads; onnxruntime rows are interleaved with each other.",
        "",
        "```",
        summary["calibration_report"],
        "```",
        "",
        "| method | digits FD | accuracy | rel-L2 vs fp32 | PSNR vs fp32 (dB) | MACs | bit-ops vs fp32 "
        "| delta layers | state MB | peak act. MB | wall s | speedup vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        layers = f"{row['delta_layers']}/{row['layers']}" if "layers" in row else "—"
        state = f"{row['state_bytes'] / 1e6:.1f}" if "state_bytes" in row else "—"
        peak = f"{row['peak_activation_bytes'] / 1e6:.1f}" if "peak_activation_bytes" in row else "—"
        lines.append(
            f"| {row['method']} | {_format(row, 'fd', '.2f')} | {_format(row, 'accuracy', '.3f')} | "
            f"{_format(row, 'rel_l2_vs_fp32', '.2e')} | {_format(row, 'psnr_vs_fp32', '.1f')} | "
            f"{_format(row, 'mac_fraction', '.3f')} | {_format(row, 'bit_operation_fraction', '.4f')} | "
            f"{layers} | {state} | {peak} | {row['wall_s_median']:.2f} | {row['speedup_vs_fp32']:.2f}x |"
        )
    for name, defo in summary["defo"].items():
        lines += [
            "",
            f"## Defo: {name}",
            "",
            f"Cost-model decisions agree with the measured per-layer latencies for "
            f"{defo['agreement']:.0%} of layers (measured at batch {summary['timing_batch']}, "
            f"interleaved, medians).",
            "",
            "| layer group | layers | full measured (us) | delta measured (us) | full model (us) | delta model (us) |",
            "|---|---|---|---|---|---|",
        ]
        for group, cost in defo["groups"].items():
            lines.append(
                f"| {group} | {len(cost['layers'])} | {cost['full_measured_s'] * 1e6:.0f} | "
                f"{cost['delta_measured_s'] * 1e6:.0f} | {cost['full_model_s'] * 1e6:.0f} | "
                f"{cost['delta_model_s'] * 1e6:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
