"""Time and length shortcuts (ODEl) on dit-digits-flow: quality against MACs over a grid
of Euler steps x depth, in one run.

    python benchmarks/shortcuts.py            # writes benchmarks/results/shortcuts.{json,md,png}

Configurations (all step programs on the torch backend, Euler on the flow ODE):
- full depth: the teacher dit-digits-flow at 2, 4, 8, 16 and 50 steps (fewer steps of
  the full model is the baseline a shortcut must beat at equal MACs);
- ODEl: dit-digits-flow-odel (length-consistency fine-tuned, group size 2) at depths 2,
  4 and 6 at every step count, and per-step depth plans (shallow early, deep late);
- naive truncation: the teacher's first 2 or 4 blocks and its head, no fine-tuning.
Per configuration: digits FD and classifier accuracy of ``--samples`` class-conditional
samples, PSNR against the teacher's 50-step samples from the same noise, MACs per sample
per run (counted on the graphs), and the median wall time of one run of
``--timing-batch`` samples (all configurations interleaved, ``--repeats`` rounds after a
warm-up). FD seed noise: the teacher at 16 and 50 steps on ``--noise-seeds`` seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from common import generate, run_metadata, time_runs

from diffopt import capture, optimize
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd
from diffopt.measure.fidelity import psnr
from diffopt.measure.macs import macs_per_run
from diffopt.measure.shortcuts import spread
from diffopt.models import example_inputs, load
from diffopt.passes.length_shortcut import LengthShortcutPass, depth_schedule

STEPS = (2, 4, 8, 16, 50)
PLANS = {"2>6": [2, 6], "2>4>6": [2, 4, 6]}  # shallow early, deep late
PLAN_STEPS = (4, 8, 16)
NAIVE_DEPTHS = (2, 4)
RESULTS = Path("benchmarks/results")


def configurations():
    """(family, name, denoiser, steps, depth per step) of every configuration."""
    teacher, _ = load("dit-digits-flow")
    odel, _ = load("dit-digits-flow-odel")
    inputs = example_inputs("dit-digits-flow")
    teacher_graph = capture(teacher, inputs)
    full_depth = len(teacher.transformer_blocks)
    shortcut = optimize(
        capture(odel.base, inputs),
        [LengthShortcutPass(odel.group_size, length_embedding=odel.length_embedding.weight.detach())],
    )
    configs = [
        ("full depth (teacher)", f"teacher {s} steps", optimize(teacher_graph), s, [full_depth] * s) for s in STEPS
    ]
    for depth in odel.depths:
        configs += [
            (
                f"ODEl depth {depth}",
                f"ODEl d{depth} {s} steps",
                shortcut.with_schedule(depth_schedule(depth)),
                s,
                [depth] * s,
            )
            for s in STEPS
        ]
    for plan_name, plan in PLANS.items():
        for s in PLAN_STEPS:
            per_step = spread(plan, s)
            configs.append(
                (
                    f"ODEl plan {plan_name}",
                    f"ODEl {plan_name} {s} steps",
                    shortcut.with_schedule(depth_schedule(per_step)),
                    s,
                    per_step,
                )
            )
    for depth in NAIVE_DEPTHS:
        naive = optimize(teacher_graph, [LengthShortcutPass(group_size=depth, depths=(depth,))])
        configs += [
            (f"naive truncation depth {depth}", f"naive d{depth} {s} steps", naive, s, [depth] * s) for s in STEPS
        ]
    return configs, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--noise-seeds", type=int, default=3)
    parser.add_argument("--timing-batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--report-only", action="store_true", help="re-derive findings, markdown and plot from the saved JSON"
    )
    args = parser.parse_args()
    if args.report_only:
        summary = json.loads((RESULTS / "shortcuts.json").read_text())
        summary["findings"] = findings(summary["rows"], summary["fd_seed_noise"])
        write(summary)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    _, config = load("dit-digits-flow")
    configs, inputs = configurations()
    one = tuple(value[:1] for value in inputs)
    labels = torch.arange(args.samples) % 10
    reference = generate(_named(configs, "teacher 50 steps"), config, 50, args.samples, seed=0)
    rows = []
    for family, name, denoiser, steps, per_step in configs:
        images = reference if name == "teacher 50 steps" else generate(denoiser, config, steps, args.samples, seed=0)
        rows.append(
            {
                "family": family,
                "name": name,
                "steps": steps,
                "depth_per_step": per_step,
                "fd": digits_fd(images),
                "accuracy": class_accuracy(images, labels),
                "psnr_vs_teacher_50": psnr(images, reference),
                "macs_per_sample": macs_per_run(denoiser.program, one, num_steps=steps),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    noise = {}
    for steps in (16, 50):
        fds = [row["fd"] for row in rows if row["name"] == f"teacher {steps} steps"]
        for seed in range(1, args.noise_seeds):
            teacher = _named(configs, f"teacher {steps} steps")
            fds.append(digits_fd(generate(teacher, config, steps, args.samples, seed=seed)))
        noise[str(steps)] = {"fds": fds, "mean": statistics.mean(fds), "stdev": statistics.stdev(fds)}
        print(f"teacher {steps} steps FD over seeds: {fds}", flush=True)
    times = time_runs(
        {name: (denoiser, steps) for _, name, denoiser, steps, _ in configs}, config, args.timing_batch, args.repeats
    )
    base = statistics.median(times["teacher 50 steps"])
    for row in rows:
        row["median_s"] = statistics.median(times[row["name"]])
        row["speedup_vs_teacher_50"] = base / row["median_s"]
    summary = {
        **run_metadata("shortcuts.py", args),
        "fd_seed_noise": noise,
        "rows": rows,
        "findings": findings(rows, noise),
    }
    write(summary)


def write(summary: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shortcuts.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / "shortcuts.md").write_text(to_markdown(summary))
    plot(summary["rows"], RESULTS / "shortcuts.png")
    print(json.dumps(summary["findings"], indent=2))


def _named(configs, name: str):
    return next(denoiser for _, n, denoiser, _, _ in configs if n == name)


def findings(rows: list[dict], noise: dict) -> dict:
    """The issue's checks, computed from the rows (nothing here is asserted by hand)."""
    by_name = {row["name"]: row for row in rows}
    band = noise["16"]["mean"] + 2 * noise["16"]["stdev"]
    teacher_in_band = [r for r in rows if r["family"].startswith("full depth") and r["fd"] <= band]
    cheapest_full = min(teacher_in_band, key=lambda r: r["macs_per_sample"]) if teacher_in_band else None
    shortcuts_in_band = sorted(
        (r for r in rows if r["family"].startswith("ODEl") and r["fd"] <= band), key=lambda r: r["macs_per_sample"]
    )
    full_after = by_name["ODEl d6 50 steps"]["fd"]
    naive = [
        {
            "depth": depth,
            "steps": steps,
            "odel_fd": by_name[f"ODEl d{depth} {steps} steps"]["fd"],
            "naive_fd": by_name[f"naive d{depth} {steps} steps"]["fd"],
            "odel_psnr": by_name[f"ODEl d{depth} {steps} steps"]["psnr_vs_teacher_50"],
            "naive_psnr": by_name[f"naive d{depth} {steps} steps"]["psnr_vs_teacher_50"],
        }
        for depth in NAIVE_DEPTHS
        for steps in STEPS
    ]
    teacher_rows = [r for r in rows if r["family"].startswith("full depth")]
    equal_macs = []
    for teacher in teacher_rows:
        cheaper = [
            r for r in rows if r["family"].startswith("ODEl") and r["macs_per_sample"] <= teacher["macs_per_sample"]
        ]
        best = min(cheaper, key=lambda r: r["fd"]) if cheaper else None
        equal_macs.append(
            {
                "teacher": teacher["name"],
                "teacher_fd": teacher["fd"],
                "macs_per_sample": teacher["macs_per_sample"],
                "best_odel_within": best and {k: best[k] for k in ("name", "fd", "macs_per_sample")},
            }
        )
    return {
        "equal_macs": equal_macs,
        "two_x_fewer_macs_in_band": any(
            s["mac_reduction_vs_cheapest_full_depth"] and s["mac_reduction_vs_cheapest_full_depth"] >= 2
            for s in shortcuts_in_band_rows(shortcuts_in_band, cheapest_full)
        ),
        "band": {
            "definition": "FD <= mean + 2 stdev of the teacher's 16-step FD over seeds",
            "fd_upper": band,
        },
        "cheapest_full_depth_in_band": cheapest_full
        and {k: cheapest_full[k] for k in ("name", "fd", "macs_per_sample")},
        "shortcuts_in_band": shortcuts_in_band_rows(shortcuts_in_band, cheapest_full),
        "full_depth_after_fine_tuning": {
            "odel_d6_50_fd": full_after,
            "teacher_50_fd_mean": noise["50"]["mean"],
            "teacher_50_fd_stdev": noise["50"]["stdev"],
            "within_2_stdev": abs(full_after - noise["50"]["mean"]) <= 2 * noise["50"]["stdev"],
        },
        "naive_truncation_vs_odel": naive,
    }


def shortcuts_in_band_rows(in_band: list[dict], cheapest_full: dict | None) -> list[dict]:
    return [
        {
            "name": r["name"],
            "fd": r["fd"],
            "macs_per_sample": r["macs_per_sample"],
            "mac_reduction_vs_cheapest_full_depth": cheapest_full["macs_per_sample"] / r["macs_per_sample"]
            if cheapest_full
            else None,
        }
        for r in in_band
    ]


def to_markdown(summary: dict) -> str:
    f = summary["findings"]
    lines = [
        "# Time and length shortcuts (ODEl) on dit-digits-flow",
        "",
        f"Produced by `{summary['command']}` ({summary['samples']} samples per configuration, Euler; "
        f"wall time: median of {summary['repeats']} interleaved runs of {summary['timing_batch']} samples, "
        f"{summary['threads']} threads, torch {summary['torch']} eager fp32 on CPU). PSNR is against the "
        "teacher's 50-step samples from the same noise.",
        "",
        "| configuration | steps | MACs / sample (M) | digits FD | accuracy | PSNR (dB) | median s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['macs_per_sample'] / 1e6:.1f} | {r['fd']:.2f} | {r['accuracy']:.3f} "
            f"| {r['psnr_vs_teacher_50']:.1f} | {r['median_s']:.3f} | {r['speedup_vs_teacher_50']:.2f}x |"
        )
    noise = summary["fd_seed_noise"]
    full = f["full_depth_after_fine_tuning"]
    lines += [
        "",
        "## Findings",
        "",
        f"- FD seed noise of the teacher: 16 steps {noise['16']['mean']:.2f} ± {noise['16']['stdev']:.2f}, "
        f"50 steps {noise['50']['mean']:.2f} ± {noise['50']['stdev']:.2f} (mean ± stdev over "
        f"{len(noise['50']['fds'])} seeds).",
        f"- Full depth after fine-tuning: ODEl depth 6 at 50 steps has FD {full['odel_d6_50_fd']:.2f}; "
        f"{'within' if full['within_2_stdev'] else 'outside'} two seed-noise standard deviations of the teacher.",
        f"- Quality band (FD ≤ {f['band']['fd_upper']:.2f}, {f['band']['definition']}): the cheapest full-depth "
        f"configuration in it is {_described(f['cheapest_full_depth_in_band'])}.",
        "- Shortcut configurations in the band: "
        + (
            ", ".join(
                f"{s['name']} (FD {s['fd']:.2f}, {s['mac_reduction_vs_cheapest_full_depth']:.2f}x fewer MACs)"
                for s in f["shortcuts_in_band"]
            )
            or "none"
        )
        + ".",
        f"- A shortcut in the band at 2x or more fewer MACs than the cheapest full-depth configuration in it: "
        f"{'yes' if f['two_x_fewer_macs_in_band'] else 'no'}.",
        "- At equal MACs (best ODEl FD at no more MACs than the teacher's step count): "
        + "; ".join(
            f"{e['teacher']} FD {e['teacher_fd']:.2f} vs "
            + (
                "none"
                if e["best_odel_within"] is None
                else f"{e['best_odel_within']['name']} {e['best_odel_within']['fd']:.2f}"
            )
            for e in f["equal_macs"]
        )
        + ".",
        "- Naive truncation vs fine-tuned at the same depth (FD / PSNR): "
        + "; ".join(
            f"d{n['depth']} {n['steps']} steps {n['naive_fd']:.1f} vs {n['odel_fd']:.1f} / "
            f"{n['naive_psnr']:.1f} vs {n['odel_psnr']:.1f} dB"
            for n in f["naive_truncation_vs_odel"]
        )
        + ".",
        "",
        "![quality vs MACs](shortcuts.png)",
        "",
    ]
    return "\n".join(lines)


def _described(row: dict | None) -> str:
    return "none" if row is None else f"{row['name']} ({row['macs_per_sample'] / 1e6:.1f} M MACs)"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for family in dict.fromkeys(r["family"] for r in rows):
        points = sorted((r for r in rows if r["family"] == family), key=lambda r: r["macs_per_sample"])
        macs = [r["macs_per_sample"] / 1e6 for r in points]
        style = "--" if family.startswith("naive") else "-"
        axes[0].plot(macs, [r["fd"] for r in points], style, marker="o", label=family)
        axes[1].plot(macs, [r["psnr_vs_teacher_50"] for r in points], style, marker="o", label=family)
    axes[0].set(xscale="log", yscale="log", xlabel="MACs per sample (M)", ylabel="digits FD (lower is better)")
    axes[1].set(xscale="log", xlabel="MACs per sample (M)", ylabel="PSNR vs teacher 50 steps (dB)")
    axes[1].legend(fontsize=7)
    figure.suptitle("dit-digits-flow: steps x depth (ODEl) vs full-depth Euler vs naive truncation")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
