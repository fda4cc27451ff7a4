"""Flow maps (AYF-EMD) on digits: the distilled dit-digits-flowmap against its teacher.

    python benchmarks/flow_maps.py            # writes benchmarks/results/flow_maps.{json,md} and
                                              # benchmarks/results/flow_maps_<N>steps.png

At 1, 2, 4 and 8 steps: the flow map (``FlowMapSampler``, even jumps from 1 to 0) and the
teacher dit-digits-flow with Euler at the same step counts; both as step programs on the
torch backend. Per configuration: digits FD and accuracy of ``--samples`` class-
conditional samples, PSNR against the teacher's 50-step samples from the same noise,
MACs per sample per run, median wall time of one run of ``--timing-batch`` samples
(interleaved, ``--repeats`` rounds after a warm-up). ODEl's best configuration at no
more MACs is read from ``benchmarks/results/shortcuts.json`` (same model family, noise
and sample count). FD seed noise: the teacher at 50 steps on ``--noise-seeds`` seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from common import CHUNK, generate, run_metadata, time_runs

from diffopt import capture, optimize
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd
from diffopt.evaluation.metrics.grid import save_grid
from diffopt.measure.fidelity import psnr
from diffopt.measure.macs import macs_per_run
from diffopt.models import example_inputs, load
from diffopt.sampling.flow_map import FlowMapSampler

STEPS = (1, 2, 4, 8)
RESULTS = Path("benchmarks/results")


def generate_flow_map(denoiser, steps: int, n: int, seed: int) -> torch.Tensor:
    """Like ``common.generate`` (same labels, same noise per chunk), with flow-map jumps."""
    labels = torch.arange(n) % 10
    sampler = FlowMapSampler(steps, progress=False)
    return torch.cat(
        [
            sampler.sample(
                denoiser, (labels[i : i + CHUNK],), shape=(len(labels[i : i + CHUNK]), 1, 16, 16), seed=seed + i
            )
            for i in range(0, n, CHUNK)
        ]
    )


def best_shortcut_within(macs: int, shortcuts: dict) -> dict | None:
    """ODEl's lowest-FD configuration costing at most ``macs`` per sample."""
    fitting = [r for r in shortcuts["rows"] if r["family"].startswith("ODEl") and r["macs_per_sample"] <= macs]
    return min(fitting, key=lambda r: r["fd"]) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--noise-seeds", type=int, default=3)
    parser.add_argument("--timing-batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    teacher_model, config = load("dit-digits-flow")
    flow_map_model, _ = load("dit-digits-flowmap")
    teacher = optimize(capture(teacher_model, example_inputs("dit-digits-flow")))
    flow_map_inputs = example_inputs("dit-digits-flowmap")
    flow_map = optimize(capture(flow_map_model, flow_map_inputs))
    shortcuts = json.loads((RESULTS / "shortcuts.json").read_text())
    labels = torch.arange(args.samples) % 10
    reference = generate(teacher, config, 50, args.samples, seed=0)
    teacher_fds = [digits_fd(reference)] + [
        digits_fd(generate(teacher, config, 50, args.samples, seed=seed)) for seed in range(1, args.noise_seeds)
    ]
    teacher_one = tuple(v[:1] for v in example_inputs("dit-digits-flow"))
    flow_map_one = tuple(v[:1] for v in flow_map_inputs)
    rows = []
    for steps in STEPS:
        for method, images, macs in (
            (
                "flow map",
                generate_flow_map(flow_map, steps, args.samples, 0),
                macs_per_run(flow_map.program, flow_map_one, num_steps=steps),
            ),
            (
                "teacher Euler",
                generate(teacher, config, steps, args.samples, 0),
                macs_per_run(teacher.program, teacher_one, num_steps=steps),
            ),
        ):
            rows.append(
                {
                    "method": method,
                    "steps": steps,
                    "fd": digits_fd(images),
                    "accuracy": class_accuracy(images, labels),
                    "psnr_vs_teacher_50": psnr(images, reference),
                    "macs_per_sample": macs,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if method == "flow map":
                save_grid(images[:100], RESULTS / f"flow_maps_{steps}steps.png")
    runners = {f"flow map {s}": (flow_map, FlowMapSampler(s, progress=False)) for s in STEPS}
    runners |= {f"teacher Euler {s}": (teacher, s) for s in (*STEPS, 50)}
    times = time_runs(runners, config, args.timing_batch, args.repeats)
    base = statistics.median(times["teacher Euler 50"])
    for row in rows:
        row["median_s"] = statistics.median(times[f"{row['method']} {row['steps']}"])
        row["speedup_vs_teacher_50"] = base / row["median_s"]
        if row["method"] == "flow map":
            best = best_shortcut_within(row["macs_per_sample"], shortcuts)
            row["odel_best_within_macs"] = best and {k: best[k] for k in ("name", "fd", "macs_per_sample")}
    noise = {"fds": teacher_fds, "mean": statistics.mean(teacher_fds), "stdev": statistics.stdev(teacher_fds)}
    summary = {
        **run_metadata("flow_maps.py", args),
        "teacher_50_fd_seed_noise": noise,
        "teacher_50_median_s": base,
        "rows": rows,
        "findings": findings(rows, noise),
    }
    (RESULTS / "flow_maps.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / "flow_maps.md").write_text(to_markdown(summary))
    print(json.dumps(summary["findings"], indent=2))


def findings(rows: list[dict], noise: dict) -> dict:
    """The issue's checks, computed from the rows."""
    fd = {(r["method"], r["steps"]): r["fd"] for r in rows}
    band = noise["mean"] + 2 * noise["stdev"]
    return {
        "teacher_50_fd_band": band,
        "flow_map_4_within_seed_noise_of_teacher_50": fd["flow map", 4] <= band,
        "flow_map_4_vs_teacher_50_mean": fd["flow map", 4] / noise["mean"],
        "flow_map_4_beats_euler_4_by_more_than_2_stdev": fd["teacher Euler", 4] - fd["flow map", 4]
        > 2 * noise["stdev"],
        "flow_map_8_not_worse_than_4": fd["flow map", 8] <= fd["flow map", 4] + 2 * noise["stdev"],
    }


def to_markdown(summary: dict) -> str:
    noise, f = summary["teacher_50_fd_seed_noise"], summary["findings"]
    lines = [
        "# Flow maps (AYF-EMD) on digits",
        "",
        f"Produced by `{summary['command']}` ({summary['samples']} samples per row; PSNR against the teacher's "
        f"50-step Euler samples from the same noise; wall time: median of {summary['repeats']} interleaved runs "
        f"of {summary['timing_batch']} samples, {summary['threads']} threads, torch {summary['torch']} eager fp32 "
        "on CPU; speed-up against the teacher's 50 steps).",
        "",
        "| method | steps | MACs / sample (M) | digits FD | accuracy | PSNR (dB) | median s | speed-up "
        "| ODEl best at ≤ MACs (FD) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        best = r.get("odel_best_within_macs")
        odel = "" if r["method"] != "flow map" else ("none" if best is None else f"{best['name']} ({best['fd']:.2f})")
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['macs_per_sample'] / 1e6:.1f} | {r['fd']:.2f} | {r['accuracy']:.3f} "
            f"| {r['psnr_vs_teacher_50']:.1f} | {r['median_s']:.3f} | {r['speedup_vs_teacher_50']:.1f}x | {odel} |"
        )
    lines += [
        "",
        f"Teacher at 50 steps: FD {noise['mean']:.2f} ± {noise['stdev']:.2f} over {len(noise['fds'])} seeds; band "
        f"(mean + 2 stdev) {f['teacher_50_fd_band']:.2f}.",
        "",
        f"- 4-step flow map within the teacher's 50-step band: {f['flow_map_4_within_seed_noise_of_teacher_50']} "
        f"(FD ratio to the teacher's mean {f['flow_map_4_vs_teacher_50_mean']:.2f}).",
        f"- 4-step flow map beats 4-step Euler by more than two seed-noise stdev: "
        f"{f['flow_map_4_beats_euler_4_by_more_than_2_stdev']}.",
        f"- 8 steps not worse than 4 (up to noise): {f['flow_map_8_not_worse_than_4']}.",
        "",
        "Sample grids: " + ", ".join(f"[{s} steps](flow_maps_{s}steps.png)" for s in STEPS),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
