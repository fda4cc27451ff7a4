"""Helpers the benchmark scripts share: run metadata and the bf16-autocast baseline, and
(from ``diffopt.evaluation.runs``) digit generation and interleaved timing. Scripts import
it as ``common`` (Python puts the script's folder on the path)."""

from __future__ import annotations

import platform

import torch

from diffopt.evaluation.runs import CHUNK, DIGIT_SHAPE, generate, scheduler, time_runs

__all__ = ["CHUNK", "DIGIT_SHAPE", "Bf16Autocast", "generate", "run_metadata", "scheduler", "time_runs"]


def run_metadata(script: str, args) -> dict:
    """What a results file records about its run: the command that reproduces it (every
    option spelled out), threads, torch version and processor."""
    options = " ".join(
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {_argument(v)}"
        for k, v in vars(args).items()
        if v is not None and v is not False
    )
    return {
        "command": f"python benchmarks/{script} {options}".strip(),
        **vars(args),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }


def _argument(value) -> str:
    """An option's value as typed on the command line (lists: space-separated)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class Bf16Autocast:
    """The plain model under CPU bf16 autocast."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, *conditions):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x, t, *conditions, return_dict=False)[0].float()
