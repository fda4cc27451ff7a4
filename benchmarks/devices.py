"""Eager vs compiled step programs, fp32 vs bf16, and onnxruntime, on one device (CPU or CUDA).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/devices.py --device cpu --out benchmarks/results/devices_cpu.json

For each runner: wall seconds of a 50-step DDIM run (median of interleaved repeats after a
warm-up round, which also absorbs torch.compile's compilation; compile time is reported
separately), the ratio against the diffusers model in eager fp32 in the same run, and PSNR
of its samples against that model's samples from the same noise. Runners: the diffusers
model; the identity program and each caching configuration, eager and compiled
(``optimize(..., backend="compiled")``: ``torch.compile`` per variant, CUDA graphs on
CUDA); the identity program in bf16 (weights cast once); on CPU also the exported identity
bundle on onnxruntime. ``--model dit-xl`` builds a DiT-XL/2-sized random-weight DiT
(meant for a GPU; far too slow for a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import time_runs

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.export import to_onnx
from diffopt.measure.fidelity import psnr
from diffopt.models import example_inputs, load
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.runtime.runtimes import load_bundle

CACHES = {
    "block reuse 1-4 p2": lambda depth: [
        BlockCachePass(blocks=tuple(f"transformer_blocks.{i}" for i in range(1, 5)), period=2)
    ],
    "block reuse p3": lambda depth: [
        BlockCachePass(blocks=tuple(f"transformer_blocks.{i}" for i in range(2, depth)), period=3)
    ],
    "first-block cache 0.1": lambda depth: [FirstBlockCachePass(0.1)],
    "ICC svd r16 p3": lambda depth: [IncrementCalibratedCachePass(rank=16, period=3)],
}


def dit_xl():
    """A DiT-XL/2-sized diffusers DiT (28 blocks, hidden 1152, 256 tokens) with random weights."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=4,
        num_layers=28,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    config = {"kind": "ddpm", "beta_schedule": "linear", "prediction_type": "epsilon"}
    inputs = (torch.randn(2, 4, 32, 32), torch.tensor([999, 5]), torch.tensor([0, 1]))
    return model, config, inputs, 28


class EagerModel:
    """The plain model on a device, called like a denoiser (the Sampler reads ``device``)."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model.to(device), device

    def __call__(self, x, t, labels):
        with torch.no_grad():
            return self.model(x, timestep=t, class_labels=labels, return_dict=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("dit-digits", "dit-xl"), default="dit-digits")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/devices_cpu.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.model == "dit-digits":
        model, config = load("dit-digits")
        inputs, depth = example_inputs("dit-digits"), 6
    else:
        model, config, inputs, depth = dit_xl()
    latent_shape = tuple(inputs[0].shape[1:])
    graph = capture(model, inputs)
    runners, compile_seconds = {"diffusers model eager": EagerModel(model, device)}, {}
    for name, passes in {"identity": lambda depth: [], **CACHES}.items():
        runners[f"{name} eager"] = optimize(graph, passes(depth), device=device)
        runners[f"{name} compiled"] = optimize(graph, passes(depth), device=device, backend="compiled")
    runners["identity bf16 eager"] = optimize(graph, device=device, dtype=torch.bfloat16)
    if device.type == "cpu":
        bundle = Path(tempfile.mkdtemp()) / "identity"
        to_onnx(optimize(graph), bundle)
        runners["identity onnxruntime"] = load_bundle(bundle, threads=torch.get_num_threads())
    rows = []
    for batch in args.batch_sizes:
        labels = torch.arange(batch) % 10
        sampler = Sampler(make_scheduler(config, "ddim", args.steps), progress=False)
        samples = {}
        for name, runner in runners.items():  # quality (and, for compiled runners, the compilation)
            started = time.perf_counter()
            samples[name] = sampler.sample(runner, (labels,), shape=(batch, *latent_shape), seed=0).cpu()
            if "compiled" in name:
                compile_seconds[f"{name} batch {batch}"] = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = time_runs(
            {name: (runner, args.steps) for name, runner in runners.items()}, config, batch, args.repeats, latent_shape
        )
        base = statistics.median(times["diffusers model eager"])
        for name in runners:
            median = statistics.median(times[name])
            rows.append(
                {
                    "runner": name,
                    "batch": batch,
                    "median_s": median,
                    "all_s": times[name],
                    "speedup_vs_diffusers_eager": base / median,
                    "psnr_vs_diffusers_eager": psnr(samples[name], samples["diffusers model eager"]),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    summary = {
        "model": args.model,
        "device": str(device),
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "compile_and_first_run_s": compile_seconds,
        "command": f"python benchmarks/devices.py --device {args.device} --model {args.model} --batch-sizes "
        f"{' '.join(map(str, args.batch_sizes))} --steps {args.steps} --repeats {args.repeats} --out {args.out}",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    table = [
        "| runner | batch | median s | speedup vs diffusers eager | PSNR vs diffusers eager (dB) |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {r['runner']} | {r['batch']} | {r['median_s']:.3f} | {r['speedup_vs_diffusers_eager']:.2f}x | "
        f"{r['psnr_vs_diffusers_eager']:.1f} |"
        for r in rows
    ]
    header = (
        f"# Eager vs compiled vs onnxruntime ({args.model}, {device})\n\n`{summary['command']}`: torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {args.steps}-step DDIM, median of "
        f"{args.repeats} interleaved runs after a warm-up round (which compiles).\n\n"
    )
    args.out.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
