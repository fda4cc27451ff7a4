"""Helpers the benchmark scripts share: run metadata and the bf16-autocast baseline, and
(from ``diffopt.evaluation.runs``) digit generation and interleaved timing. Scripts import
it as ``common`` (Python puts the script's folder on the path)."""

from __future__ import annotations

import platform
import random
import statistics
import threading
import time
from collections.abc import Callable

import torch

from diffopt.evaluation.runs import CHUNK, DIGIT_SHAPE, generate, scheduler, time_runs

__all__ = [
    "CHUNK",
    "DIGIT_SHAPE",
    "Bf16Autocast",
    "generate",
    "poisson_load",
    "run_metadata",
    "scheduler",
    "time_runs",
]


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


def poisson_load(
    send: Callable[[int], dict], rate: float, seconds: float, seed: int, slo_s: float | None = None
) -> dict:
    """Requests arriving as a Poisson process at ``rate`` per second for ``seconds``, each sent
    from its own thread by ``send(index)`` (it returns what the answer said, e.g. ``{"rows":
    ...}``, and raises on an error). Per run: throughput (completed requests / time from the
    first arrival to the last answer), latency p50/p95/p99, and with ``slo_s`` the goodput
    (requests completed within ``slo_s``, per second, over the same span)."""
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    while now < seconds:
        now += rng.expovariate(rate)
        arrivals.append(now)
    records: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def request(index: int, at: float) -> None:
        time.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        try:
            record = {**send(index), "latency": time.perf_counter() - sent}
        except Exception as error:  # noqa: BLE001 - a failed request is counted, with its message
            record = {"error": f"{type(error).__name__}: {error}"[:200]}
        record["done"] = time.perf_counter() - start
        with lock:
            records.append(record)

    threads = [threading.Thread(target=request, args=(i, at)) for i, at in enumerate(arrivals)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = [r for r in records if "latency" in r]
    latencies = sorted(r["latency"] for r in ok)

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    span = max(r["done"] for r in records) - arrivals[0] if records else float("nan")
    rows = [r["rows"] for r in ok if "rows" in r]
    result = {
        "rate": rate,
        "requests": len(arrivals),
        "completed": len(ok),
        "errors": [r["error"] for r in records if "error" in r][:5],
        "throughput": len(ok) / span,
        "p50": percentile(0.50),
        "p95": percentile(0.95),
        "p99": percentile(0.99),
        "mean_batch_rows": statistics.mean(rows) if rows else float("nan"),
    }
    if slo_s is not None:
        result |= {"slo_s": slo_s, "goodput": sum(r["latency"] <= slo_s for r in ok) / span}
    return result
