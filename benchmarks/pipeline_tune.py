"""``diffopt.tune`` on a whole diffusers pipeline: the shipped dit-digits inside a
``DiTPipeline`` (the pipeline of ``benchmarks/pipelines.py``), 50 DDIM steps.

    python benchmarks/pipeline_tune.py   # writes benchmarks/results/tune_dit-digits_pipeline.{json,png,passes.json}

Scored on ``--calls`` pipeline calls of ``--batch`` class labels each (seeds 0, 1, ...), validated on
the same calls with held-out seeds; cost in MACs (the work each stream's steps ran, over the plain
pipeline's denoiser calls). The default search space: ``diffopt.measure.search.search_space``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import run_metadata
from pipelines import STEPS

import diffopt
from diffopt.measure.search import format_summary, save
from diffopt.models import load
from diffopt.models.pipelines import PixelSpace


def main() -> None:
    from diffusers import DDIMScheduler, DiTPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-psnr", type=float, default=40.0)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/tune_dit-digits_pipeline")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load("dit-digits")
    pipe = DiTPipeline(model, PixelSpace(), DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(args.batch)]
    calls = [
        {"class_labels": labels, "guidance_scale": 1.0, "num_inference_steps": STEPS, "seed": seed}
        for seed in range(args.calls)
    ]
    started = time.perf_counter()
    summary = diffopt.tune(pipe, calls, args.min_psnr)
    summary.update(run_metadata("pipeline_tune.py", args), seconds=time.perf_counter() - started)
    passes = save(summary, args.out)
    print(format_summary(summary))
    print(f"wrote {args.out}.json, {args.out}.png and {passes}")


if __name__ == "__main__":
    main()
