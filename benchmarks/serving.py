"""Serving under load on Ray Serve (localhost only): step-level continuous batching against
whole-run serving, one request at a time and Ray Serve's request-level batching.

    python benchmarks/serving.py   # writes benchmarks/results/serving.{json,md,png}

The model: the shipped dit-digits with the forecast cache over its block span (a fixed
schedule), exported to an ONNX bundle and served on onnxruntime; every request asks for one
digit at ``--steps`` DDIM steps. For each server and replica count, requests arrive as a
Poisson process at each rate (``--rates``, in multiples of one-at-a-time capacity, 1 / the
lone request's latency) for ``--seconds``; each is posted from its own thread with the
retrying client. Per rate: throughput (completed samples / time from the first arrival to
the last answer), latency p50/p95/p99, and the mean rows of the forwards the requests ran
in (``X-Diffopt-Batch-Rows``). The same machine (2 cores) runs the load generator, Ray and
every replica, so absolute numbers are this machine's; compare rows within the run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

from common import poisson_load, run_metadata

from diffopt import capture, optimize
from diffopt.export.onnx import to_onnx
from diffopt.models import example_inputs, load
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.serving.http import post_sample

RESULTS = Path("benchmarks/results")
FORECAST = {"order": 1, "period": 4, "warmup": 5, "targets": "blocks"}


def export_bundle(directory: Path, steps: int) -> Path:
    model, config = load("dit-digits")
    program = optimize(capture(model, example_inputs("dit-digits")), [ForecastCachePass(**FORECAST)])
    to_onnx(program, directory / "bundle", scheduler_config=config)
    return directory / "bundle"


def servers(bundle: Path, replicas: int, max_batch: int) -> dict:
    """Name -> Ray Serve application."""
    from diffopt.serving.deployment import deployment
    from diffopt.serving.whole_runs import whole_run_deployment

    threads = max(1, 2 // replicas)
    return {
        "one request at a time": whole_run_deployment(str(bundle), max_batch=1, num_replicas=replicas, threads=threads),
        "request-level batching (@serve.batch)": whole_run_deployment(
            str(bundle), max_batch=max_batch, batch_wait_s=0.01, num_replicas=replicas, threads=threads
        ),
        "step-level continuous batching": deployment(
            str(bundle), max_batch=max_batch, max_waiting=512 - max_batch, num_replicas=replicas, threads=threads
        ),
    }


def _sample_sender(url: str, steps: int):
    """``poisson_load``'s ``send``: one digit at ``steps`` steps; the rows its forwards had."""

    def send(index: int) -> dict:
        payload = {"class_labels": [index % 10], "seed": index, "steps": steps}
        _, headers = post_sample(f"{url}/sample", payload, retries=4, timeout=300)
        return {"rows": float(headers["x-diffopt-batch-rows"])}

    return send


def main() -> None:
    import ray
    from ray import serve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        bundle = export_bundle(Path(directory), args.steps)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            lone = None
            for replicas in args.replicas:
                for name, app in servers(bundle, replicas, args.max_batch).items():
                    serve.run(app, route_prefix="/", name="bench")
                    for i in range(3):  # warm-up
                        post_sample(f"{url}/sample", {"class_labels": [1], "seed": i, "steps": args.steps})
                    if lone is None:  # a lone request's latency, on the first server: one at a time, one replica
                        times = []
                        for i in range(10):
                            started = time.perf_counter()
                            post_sample(f"{url}/sample", {"class_labels": [i % 10], "seed": i, "steps": args.steps})
                            times.append(time.perf_counter() - started)
                        lone = statistics.median(times)
                        print(f"lone request: {lone * 1000:.1f} ms", flush=True)
                    for multiple in args.rates:
                        send = _sample_sender(url, args.steps)
                        result = poisson_load(send, multiple / lone, args.seconds, seed=int(multiple * 1000))
                        rows.append({"server": name, "replicas": replicas, "rate_multiple": multiple, **result})
                        print(json.dumps(rows[-1]), flush=True)
                    serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    payload = {**run_metadata("serving.py", args), "lone_latency_s": lone, "forecast": FORECAST, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / "serving.md").write_text(markdown(payload))
    plot(payload, RESULTS / "serving.png")
    print(markdown(payload))


def markdown(payload: dict) -> str:
    lines = [
        "# Serving dit-digits on Ray Serve: step-level continuous batching vs whole runs",
        "",
        f"Produced by `{payload['command']}`. Lone request: {payload['lone_latency_s'] * 1000:.1f} ms "
        f"({payload['steps']} DDIM steps, forecast cache, onnxruntime). Rates in multiples of 1 / lone latency; "
        f"{payload['seconds']:.0f} s of Poisson arrivals per row; everything on one 2-core machine.",
        "",
        "| server | replicas | rate (x lone capacity) | req/s offered | throughput (samples/s) | p50 ms | p95 ms "
        "| p99 ms | mean batch rows | completed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['server']} | {r['replicas']} | {r['rate_multiple']:g} | {r['rate']:.1f} | {r['throughput']:.1f} | "
            f"{r['p50'] * 1000:.0f} | {r['p95'] * 1000:.0f} | {r['p99'] * 1000:.0f} | {r['mean_batch_rows']:.1f} | "
            f"{r['completed']}/{r['requests']} |"
        )
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(set(r["replicas"] for r in payload["rows"])), figsize=(11, 4.2), squeeze=False)
    for axis, replicas in zip(axes[0], sorted({r["replicas"] for r in payload["rows"]})):
        for server in dict.fromkeys(r["server"] for r in payload["rows"]):
            members = [r for r in payload["rows"] if r["server"] == server and r["replicas"] == replicas]
            axis.plot([r["throughput"] for r in members], [r["p95"] * 1000 for r in members], "o-", label=server)
        axis.set(xlabel="throughput (samples/s)", ylabel="p95 latency (ms)", yscale="log")
        axis.set_title(f"{replicas} replica(s)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
