"""``diffopt.enable`` inside a diffusers ``DiTPipeline`` (the shipped dit-digits), against
diffusers' own cache hooks on the same pipeline.

    python benchmarks/pipelines.py     # writes benchmarks/results/pipelines.{json,md}

The pipeline: ``DiTPipeline`` with dit-digits, a pass-through "VAE" (the model denoises
16x16 digit pixels), ``DDIMScheduler`` with the model's cosine schedule, 50 steps,
class-conditional without guidance. Every row is a ``pipe(...)`` call as a user makes it:
- the plain pipeline (the baseline) and ``diffopt.enable(pipe)`` without passes;
- first-block cache at one threshold: diffusers' ``FirstBlockCache`` hook, and diffopt's
  ``FirstBlockCachePass`` (the same decisions, so the same images);
- module forecasting every 3rd step: diffusers' ``TaylorSeer`` hook (order 1, attention
  and feed-forward outputs), and diffopt's ``ForecastCachePass`` at the same schedule;
- diffopt's best forecast configuration of ``benchmarks/results/forecast_dit-digits.md``
  (block span, order 1, period 4, 5 warm-up steps).
Per row: digits FD and accuracy of ``--samples`` samples, PSNR against the plain
pipeline's images from the same noise, the median wall time of one call of
``--timing-batch`` samples (rows interleaved, ``--repeats`` rounds after a warm-up) and
its speed-up against the plain pipeline.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
from pathlib import Path

import torch
from common import CHUNK, run_metadata

import diffopt
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd
from diffopt.measure.fidelity import psnr
from diffopt.measure.timing import interleaved_times
from diffopt.models import load
from diffopt.models.pipelines import PixelSpace
from diffopt.passes.block_cache import FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass

RESULTS = Path("benchmarks/results")
STEPS = 50
THRESHOLD = 0.1  # first-block cache; diffusers' hook at 0.1 in forecast_dit-digits.md
TAYLORSEER = {  # the "diffusers TaylorSeer interval 3" row of benchmarks/configs/caching_dit-digits.json
    "cache_interval": 3,
    "disable_cache_before_step": 1,
    "max_order": 1,
    "taylor_factors_dtype": torch.float32,
    "cache_identifiers": [r"transformer_blocks\.\d+\.(attn1|ff)"],
}


class HookedPipeline:
    """A pipeline whose transformer carries a diffusers cache hook; the hook's state is reset
    and its cache context set around each call (DiT has no ``CacheMixin`` to do it)."""

    def __init__(self, pipe, apply_hook):
        self.pipe = copy.deepcopy(pipe)
        apply_hook(self.pipe.transformer)

    def __call__(self, **kwargs):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        HookRegistry.check_if_exists_or_initialize(self.pipe.transformer).reset_stateful_hooks()
        _set_cache_context(self.pipe.transformer, CacheContext("denoise"))
        try:
            return self.pipe(**kwargs)
        finally:
            _set_cache_context(self.pipe.transformer, None)


def runners(pipe) -> dict:
    """Row name -> a callable that runs a pipeline call."""
    from diffusers import hooks

    def enabled(passes):
        return diffopt.enable(copy.deepcopy(pipe), passes)

    return {
        "plain pipeline": pipe,
        "diffopt.enable, no passes": enabled([]),
        f"diffusers FirstBlockCache hook {THRESHOLD}": HookedPipeline(
            pipe, lambda m: hooks.apply_first_block_cache(m, hooks.FirstBlockCacheConfig(threshold=THRESHOLD))
        ),
        f"diffopt FirstBlockCachePass {THRESHOLD}": enabled([FirstBlockCachePass(THRESHOLD)]),
        "diffusers TaylorSeer hook, interval 3": HookedPipeline(
            pipe, lambda m: hooks.apply_taylorseer_cache(m, hooks.TaylorSeerCacheConfig(**TAYLORSEER))
        ),
        "diffopt ForecastCachePass o1 p3 w1": enabled([ForecastCachePass(order=1, period=3, warmup=1)]),
        "diffopt ForecastCachePass blocks o1 p4 w5": enabled(
            [ForecastCachePass(order=1, period=4, warmup=5, targets="blocks")]
        ),
    }


def images(run, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """One pipeline call: digits in [-1, 1] (the pipeline maps them to [0, 1])."""
    out = run(
        class_labels=labels.tolist(),
        guidance_scale=1.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    return out * 2 - 1


def samples(run, n: int) -> torch.Tensor:
    labels = torch.arange(n) % 10
    return torch.cat([images(run, labels[i : i + CHUNK], seed=i) for i in range(0, n, CHUNK)])


def main() -> None:
    from diffusers import DDIMScheduler, DiTPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--timing-batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load("dit-digits")
    pipe = DiTPipeline(model, PixelSpace(), DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.set_progress_bar_config(disable=True)
    rows, labels = runners(pipe), torch.arange(args.samples) % 10
    produced = {name: samples(run, args.samples) for name, run in rows.items()}
    reference = produced["plain pipeline"]
    timing_labels = torch.arange(args.timing_batch) % 10
    timed = {
        name: (lambda repeat, run=run: images(run, timing_labels, seed=10_000 + repeat)) for name, run in rows.items()
    }
    times = interleaved_times(timed, args.repeats, progress=True)  # round 0 warms up
    baseline_s = statistics.median(times["plain pipeline"])
    results = []
    for name, out in produced.items():
        median_s = statistics.median(times[name])
        results.append(
            {
                "row": name,
                "fd": digits_fd(out),
                "accuracy": class_accuracy(out, labels),
                "psnr_vs_plain": psnr(out, reference),
                "median_s": median_s,
                "speedup": baseline_s / median_s,
                "times_s": times[name],
            }
        )
        print(json.dumps({k: v for k, v in results[-1].items() if k != "times_s"}), flush=True)
    pairs = {
        f"first-block cache {THRESHOLD}, diffopt vs diffusers' hook (the same decisions)": psnr(
            produced[f"diffopt FirstBlockCachePass {THRESHOLD}"],
            produced[f"diffusers FirstBlockCache hook {THRESHOLD}"],
        ),
        "forecast, diffopt o1 p3 w1 vs TaylorSeer interval 3 (17 of 50 full steps each, at 0, 3, 6, ... "
        "vs 0, 2, 5, ...)": psnr(
            produced["diffopt ForecastCachePass o1 p3 w1"], produced["diffusers TaylorSeer hook, interval 3"]
        ),
    }
    payload = {**run_metadata("pipelines.py", args), "steps": STEPS, "rows": results, "pairs_psnr": pairs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipelines.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / "pipelines.md").write_text(markdown(payload))
    print(markdown(payload))


def markdown(payload: dict) -> str:
    lines = [
        "# diffopt.enable in a diffusers DiTPipeline (dit-digits), against diffusers' cache hooks",
        "",
        f"Produced by `{payload['command']}`: {payload['samples']} samples per row, {payload['steps']} DDIM steps; "
        f"wall time: median of {payload['repeats']} interleaved pipeline calls of {payload['timing_batch']} samples, "
        f"{payload['threads']} threads, torch {payload['torch']} eager fp32 on CPU; speed-up and PSNR against the "
        f"plain pipeline (same noise).",
        "",
        "| row | digits FD | accuracy | PSNR vs plain (dB) | median s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['row']} | {r['fd']:.2f} | {r['accuracy']:.3f} | {r['psnr_vs_plain']:.1f} | "
            f"{r['median_s']:.3f} | {r['speedup']:.2f}x |"
        )
    lines += ["", "PSNR between the two implementations of one method (same noise):", ""]
    lines += [f"- {name}: {value:.1f} dB" for name, value in payload["pairs_psnr"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
