"""Caching benchmark: ICC, plain reuse, block caching and diffusers' own cache hooks on
the same trained weights, in one run.

    python benchmarks/caching.py                      # dit-digits
    python benchmarks/caching.py --model unet-digits  # the methods that apply to a UNet

Writes benchmarks/results/caching_<model>.{json,md,png}. Per method:
- quality: ``--samples`` class-conditional digits (equal counts per class) from the
  same seeded noise as the 50-step DDIM baseline: digits FD and classifier accuracy
  (distribution checks), PSNR / relative L2 / predicted-label agreement against the
  baseline's samples (paired fidelity, the primary signal);
- MACs per sample per run: counted while the quality run executes (``count_macs``:
  every matmul, convolution and attention, whatever runs it), so adaptive methods are
  charged for the decisions they actually made;
- wall time per run of ``--timing-batch`` samples: all methods interleaved, repeated
  ``--repeats`` times after a warm-up, median; speedup = baseline median / method median.
All run in torch eager fp32 on this machine's CPU (one kernel setup for every method,
so the ratios measure skipped work, not kernel choice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import generate, time_runs

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.evaluation.baselines import DiffusersCacheHook
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd, label_agreement
from diffopt.measure.calibration import calibrate
from diffopt.measure.fidelity import psnr, relative_l2
from diffopt.measure.macs import count_macs
from diffopt.models import example_inputs, load
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass

RESULTS = Path("benchmarks/results")
# TaylorSeer's default module patterns ("^transformer_blocks.*attn", matched with re.fullmatch) miss DiT's
# "attn1" and hook nothing; name the attention and feed-forward modules of every block explicitly
TAYLORSEER_MODULES = [r"transformer_blocks\.\d+\.(attn1|ff)"]


@dataclass
class Method:
    name: str
    family: str  # "DDIM", "ICC", "plain reuse", "block reuse", "first-block cache", "diffusers hook"
    steps: int
    build: Callable[[], Callable]  # -> a denoiser the Sampler can drive


def dit_methods(model, graph, calibration) -> list[Method]:
    middle = tuple(f"transformer_blocks.{i}" for i in range(1, 5))
    methods = [Method(f"DDIM {n}", "DDIM", n, lambda: model) for n in (50, 35, 25, 20)]
    methods.append(Method("DDIM 50, captured graph (no passes)", "DDIM", 50, lambda: optimize(graph)))
    icc = [("svd", rank, period, 50) for rank in (8, 16, 32) for period in (2, 3)]
    icc += [("svd", 8, 4, 50), ("svd", 8, 5, 50), ("svd", 16, 3, 35), ("svd", 8, 3, 35)]
    icc += [("channel-aware", 8, 3, 50), ("channel-aware", 8, 4, 50), ("channel-aware", 16, 3, 50)]
    for factorization, rank, period, steps in icc:
        name = f"ICC {factorization} r{rank} p{period}" + (f", {steps} steps" if steps != 50 else "")
        methods.append(
            Method(
                name,
                "ICC",
                steps,
                lambda f=factorization, r=rank, p=period: optimize(
                    graph, [IncrementCalibratedCachePass(rank=r, period=p, factorization=f)], calibration=calibration
                ),
            )
        )
    for threshold in (0.1, 0.2):
        methods.append(
            Method(
                f"ICC svd r16 adaptive {threshold}",
                "ICC",
                50,
                lambda th=threshold: optimize(graph, [IncrementCalibratedCachePass(rank=16, refresh_threshold=th)]),
            )
        )
    for period in (2, 3):
        methods.append(
            Method(
                f"layer reuse p{period}",
                "plain reuse",
                50,
                lambda p=period: optimize(graph, [IncrementCalibratedCachePass(rank=0, period=p)]),
            )
        )
        methods.append(
            Method(
                f"block reuse 1-4 p{period}",
                "block reuse",
                50,
                lambda p=period: optimize(graph, [BlockCachePass(blocks=middle, period=p)]),
            )
        )
    for threshold in (0.1, 0.2):
        methods.append(
            Method(
                f"first-block cache {threshold}",
                "first-block cache",
                50,
                lambda th=threshold: optimize(graph, [FirstBlockCachePass(th)]),
            )
        )
    methods += [
        Method(
            "diffusers FirstBlockCache 0.1",
            "diffusers hook",
            50,
            lambda: DiffusersCacheHook(model, "first-block-cache", threshold=0.1),
        ),
        Method(
            "diffusers PAB attn every 2nd",
            "diffusers hook",
            50,
            lambda: DiffusersCacheHook(
                model,
                "pyramid-attention-broadcast",
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(0, 1000),
            ),
        ),
    ]
    for interval in (2, 3):
        methods.append(
            Method(
                f"diffusers TaylorSeer interval {interval}",
                "diffusers hook",
                50,
                lambda i=interval: DiffusersCacheHook(
                    model,
                    "taylorseer",
                    cache_interval=i,
                    disable_cache_before_step=1,
                    max_order=1,
                    taylor_factors_dtype=torch.float32,
                    cache_identifiers=TAYLORSEER_MODULES,
                ),
            )
        )
    return methods


def unet_methods(model, graph, calibration) -> list[Method]:
    methods = [Method(f"DDIM {n}", "DDIM", n, lambda: model) for n in (50, 35, 25, 20)]
    for block, what in (("up_blocks.0", "deep path"), ("up_blocks.1", "all but the outer blocks")):
        for period in (2, 3):
            methods.append(
                Method(
                    f"DeepCache {block} ({what}) p{period}",
                    "block reuse",
                    50,
                    lambda b=block, p=period: optimize(graph, [BlockCachePass(blocks=(b,), period=p)]),
                )
            )
    methods.append(
        Method(
            "ICC svd r16 p2 (attention linears)",
            "ICC",
            50,
            lambda: optimize(graph, [IncrementCalibratedCachePass(rank=16, period=2)]),
        )
    )
    methods.append(
        Method(
            "layer reuse p2 (attention linears)",
            "plain reuse",
            50,
            lambda: optimize(graph, [IncrementCalibratedCachePass(rank=0, period=2)]),
        )
    )
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit-digits", choices=["dit-digits", "unet-digits"])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--timing-batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these method names (plus the 50-step baseline)")
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="skip the quality runs; write caching_<model>_timing.{json,md} (wall time only)",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, config = load(args.model)
    graph = capture(model, example_inputs(args.model))
    calibration_sampler = Sampler(make_scheduler(config, "ddim", 50), progress=False)
    calibration = calibrate(
        optimize(graph).program, calibration_sampler, (torch.arange(20) % 10,), (20, 1, 16, 16), seeds=(777, 778)
    )
    methods = (dit_methods if args.model == "dit-digits" else unet_methods)(model, graph, calibration)
    if args.only:
        methods = [m for m in methods if m.name == "DDIM 50" or m.name in args.only]
    denoisers = {m.name: m.build() for m in methods}
    if args.timing_only:
        write_timing(args, methods, denoisers, config)
        return
    rows, baseline = [], None
    for method in methods:
        started = time.perf_counter()
        with count_macs() as counter:
            images = generate(denoisers[method.name], config, method.steps, args.samples, seed=0)
        labels = torch.arange(args.samples) % 10
        baseline = images if baseline is None else baseline
        row = {
            "method": method.name,
            "family": method.family,
            "steps": method.steps,
            "macs_per_sample": counter.macs / args.samples,
            "fd": digits_fd(images),
            "accuracy": class_accuracy(images, labels),
            "psnr_vs_ddim50": psnr(images, baseline),
            "rel_l2_vs_ddim50": relative_l2(images, baseline),
            "label_agreement_vs_ddim50": label_agreement(images, baseline),
            "quality_run_s": time.perf_counter() - started,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    times = time_runs({m.name: (denoisers[m.name], m.steps) for m in methods}, config, args.timing_batch, args.repeats)
    base_macs, base_time = rows[0]["macs_per_sample"], statistics.median(times[methods[0].name])
    for row in rows:
        row["mac_fraction_of_ddim50"] = row["macs_per_sample"] / base_macs
        row["wall_s_median"] = statistics.median(times[row["method"]])
        row["wall_s_all"] = times[row["method"]]
        row["speedup_vs_ddim50"] = base_time / row["wall_s_median"]
    summary = {
        "model": args.model,
        "samples": args.samples,
        "timing_batch": args.timing_batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "command": "python benchmarks/caching.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "only"),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"caching_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    stem.with_suffix(".md").write_text(to_markdown(summary))
    plot(summary, stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png")


def write_timing(args, methods, denoisers, config) -> None:
    """Wall time per run only (interleaved, medians), for re-timing without the quality runs."""
    times = time_runs({m.name: (denoisers[m.name], m.steps) for m in methods}, config, args.timing_batch, args.repeats)
    base = statistics.median(times[methods[0].name])
    rows = [
        {
            "method": m.name,
            "steps": m.steps,
            "wall_s_median": statistics.median(times[m.name]),
            "wall_s_all": times[m.name],
            "speedup_vs_ddim50": base / statistics.median(times[m.name]),
        }
        for m in methods
    ]
    command = (
        f"python benchmarks/caching.py --model {args.model} --timing-only --timing-batch {args.timing_batch} "
        f"--repeats {args.repeats}" + (" --only " + " ".join(f'"{name}"' for name in args.only) if args.only else "")
    )
    summary = {
        "model": args.model,
        "timing_batch": args.timing_batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": command,
        "rows": rows,
    }
    stem = RESULTS / f"caching_{args.model}_timing"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# Wall time per run on {args.model} (timing only)",
        "",
        f"`{command}` — median of {args.repeats} "
        f"interleaved runs of {args.timing_batch} samples after a warm-up round, torch {torch.__version__} "
        f"eager, {torch.get_num_threads()} CPU threads. Quality and MACs: caching_{args.model}.md.",
        "",
        "| method | steps | wall s (median) | all runs (s) | speedup vs DDIM 50 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['steps']} | {r['wall_s_median']:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in r['wall_s_all'])} | {r['speedup_vs_ddim50']:.2f}x |"
        for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json/.md")


def to_markdown(summary: dict) -> str:
    lines = [
        f"# Caching methods on {summary['model']}",
        "",
        f"`{summary['command']}` — {summary['samples']} samples per method from the same seeded noise; "
        f"wall time: median of {summary['repeats']} interleaved runs of {summary['timing_batch']} samples, "
        f"torch {summary['torch']} eager fp32, {summary['threads']} CPU threads.",
        "",
        "| method | steps | MACs vs DDIM 50 | wall speedup | digits FD | accuracy | PSNR vs DDIM 50 (dB) "
        "| label agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {row['method']} | {row['steps']} | {row['mac_fraction_of_ddim50']:.3f} | "
            f"{row['speedup_vs_ddim50']:.2f}x | {row['fd']:.2f} | {row['accuracy']:.3f} | "
            f"{row['psnr_vs_ddim50']:.1f} | {row['label_agreement_vs_ddim50']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    families = sorted({row["family"] for row in summary["rows"]})
    for family in families:
        rows = [r for r in summary["rows"] if r["family"] == family]
        macs = [r["mac_fraction_of_ddim50"] for r in rows]
        left.scatter(macs, [min(r["psnr_vs_ddim50"], 60) for r in rows], label=family)
        right.scatter(macs, [r["fd"] for r in rows], label=family)
    left.set(
        xlabel="MACs per run / DDIM 50", ylabel="PSNR vs DDIM 50 (dB, capped at 60)", title="paired fidelity vs compute"
    )
    right.set(
        xlabel="MACs per run / DDIM 50",
        ylabel="digits FD (lower is better)",
        title="digits FD vs compute",
        yscale="log",
    )
    left.legend(fontsize=8)
    figure.suptitle(f"{summary['model']}: caching methods ({summary['samples']} samples each)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
