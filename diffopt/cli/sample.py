"""``diffopt sample``: class-conditional digits from a bundle on a bundle runtime."""

from __future__ import annotations

import argparse
import time

import torch

from diffopt.cli.common import UsageError, bounded, output_file
from diffopt.measure.timing import wait_for_device


def add_parser(commands) -> None:
    """The ``sample`` command and its options."""
    parser = commands.add_parser("sample", help="sample class-conditional digits from a bundle (onnxruntime)")
    parser.add_argument("bundle")
    parser.add_argument("--runtime", default="onnxruntime", help="the bundle runtime (registered name)")
    parser.add_argument("--steps", type=bounded(int, 1, "--steps"), default=50)
    parser.add_argument("--samples", type=bounded(int, 1, "--samples"), default=20)
    parser.add_argument("--seed", type=bounded(int, 0, "--seed"), default=0)
    parser.add_argument("--out", type=output_file, default="samples.png", help="PNG grid of the samples")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from diffopt.evaluation.metrics.grid import save_grid
    from diffopt.runtime.runtimes import load_bundle
    from diffopt.sampling.schedulers import make_scheduler
    from diffopt.sampling.sequential import Sampler

    denoiser = load_bundle(args.bundle, args.runtime)
    manifest = denoiser.bundle.manifest
    if manifest.scheduler is None:
        raise UsageError("this bundle has no noise-schedule config; export it with scheduler_config=...")
    latent, *_ = next(iter(manifest.variants.values())).inputs
    if len(manifest.signature.conditions) != 1:
        raise UsageError(
            f"`diffopt sample` draws class-conditional samples (one class-label condition); "
            f"this bundle takes {list(manifest.signature.conditions)}: drive it from Python with "
            f"diffopt.runtime.runtimes.load_bundle"
        )
    labels = torch.arange(args.samples) % 10
    sampler = Sampler(make_scheduler(manifest.scheduler, num_steps=args.steps))
    shape = (args.samples, *latent.shape[1:])
    started = time.perf_counter()
    samples = sampler.sample(denoiser, (labels,), shape=shape, seed=args.seed)
    wait_for_device()
    seconds = time.perf_counter() - started
    save_grid(samples, args.out)
    print(
        f"sampled {args.samples} in {seconds:.2f} s on {args.runtime} (variants used: "
        f"{sorted(set(sampler.last_stats.variants))}); grid written to {args.out}"
    )
