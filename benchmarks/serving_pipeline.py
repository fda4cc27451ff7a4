"""Serving a pipeline under load on Ray Serve (localhost only): goodput under an SLO.

    python benchmarks/serving_pipeline.py   # writes benchmarks/results/serving_pipeline.{json,md,png}

The pipeline: ``DiTPipeline`` around the shipped dit-digits (``diffopt.models.pipelines:
digits_pipeline``, DDIM), enabled with the cache that ``diffopt tune`` picked for it
(``results/tune_dit-digits_pipeline.passes.json``), behind OpenAI's images endpoint; each
request asks for one digit (the prompt is its class) at ``--steps`` steps. Three servers, the
same pipeline and passes, one replica each:

- one request at a time (whole pipeline calls);
- request-level batching: Ray Serve's ``@serve.batch`` over whole pipeline calls (requests
  that arrive while a batch runs wait for all of it);
- step-level batching: ``PipelineEngine``, every request's steps join the running forwards;
- the same with SLO admission (``PipelineEngine(slo_s=...)``, ``slo_s`` the SLO less
  ``--admission-margin`` of it for HTTP and routing, which the engine does not see): a request
  starts only when it and the running ones are expected to finish within the SLO, and one
  that cannot is answered 503 at once (counted here as a request that missed the SLO).

The SLO is ``--slo`` times a lone request's latency (measured first, on the one-at-a-time
server). For each server and rate (``--rates``, in multiples of one-at-a-time capacity, 1 /
lone latency), requests arrive as a Poisson process for ``--seconds``; per row: throughput,
latency p50/p95, goodput (requests per second that finished within the SLO). The target:
wherever request-level batching's p95 exceeds the SLO, step-level goodput (the server
configured for the SLO: with admission) is at least 1.5x request-level goodput. The same
2-core machine runs the load generator, Ray and the replica,
so absolute numbers are this machine's; compare rows within the run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

from common import poisson_load, run_metadata

from diffopt.serving.images_api import post_images

RESULTS = Path("benchmarks/results")
PIPELINE = "diffopt.models.pipelines:digits_pipeline"
PASSES = RESULTS / "tune_dit-digits_pipeline.passes.json"
CALL_DEFAULTS = {"guidance_scale": 1.0}  # the digits DiT has no null class to guide with
TARGET = 1.5  # step-level goodput / request-level goodput, wherever request-level misses the SLO at p95


SERVERS = (
    "one request at a time",
    "request-level batching (@serve.batch)",
    "step-level batching (PipelineEngine)",
    "step-level batching + SLO admission",
)


def server_app(name: str, max_batch: int, threads: int, slo_s: float | None):
    """The Ray Serve application of server ``name`` (one of ``SERVERS``)."""
    from diffopt.serving.pipeline_server import pipeline_deployment, whole_pipeline_deployment

    common = {"source": PIPELINE, "passes": str(PASSES), "call_defaults": CALL_DEFAULTS, "threads": threads}
    if name == SERVERS[0]:
        return whole_pipeline_deployment(max_batch=1, **common)
    if name == SERVERS[1]:
        return whole_pipeline_deployment(max_batch=max_batch, batch_wait_s=0.01, **common)
    admission = {"slo_s": slo_s} if name == SERVERS[3] else {}
    return pipeline_deployment(max_batch=max_batch, max_waiting=512, **admission, **common)


def _sender(url: str, steps: int):
    """``poisson_load``'s ``send``: one digit at ``steps`` steps; the rows its forwards had."""

    def send(index: int) -> dict:
        payload = {"prompt": str(index % 10), "seed": index, "num_inference_steps": steps}
        answer = post_images(url, payload, retries=0, timeout=600)  # a 503 is final: it missed the SLO
        return {"rows": float(answer.headers.get("x-diffopt-batch-rows", "nan"))}

    return send


def lone_latency(url: str, steps: int, repeats: int = 10) -> float:
    """The median latency of requests sent one after another."""
    times = []
    for index in range(repeats):
        started = time.perf_counter()
        post_images(url, {"prompt": str(index % 10), "seed": index, "num_inference_steps": steps})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    import ray
    from ray import serve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--slo", type=float, default=3.0, help="the SLO, in multiples of a lone request's latency")
    parser.add_argument("--admission-margin", type=float, default=0.15, help="share of the SLO left for HTTP, routing")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the replica")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows, lone = [], None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name in SERVERS:  # the first measures a lone request's latency, which sets the SLO
            slo_s = (1 - args.admission_margin) * args.slo * lone if lone is not None else None
            serve.run(server_app(name, args.max_batch, args.threads, slo_s), route_prefix="/", name="bench")
            for index in range(3):  # warm-up (the step-level server captures its program here)
                post_images(url, {"prompt": str(index), "seed": index, "num_inference_steps": args.steps})
            if lone is None:  # on the first server: one request at a time
                lone = lone_latency(url, args.steps)
                print(f"lone request: {lone * 1000:.1f} ms; SLO {args.slo * lone * 1000:.0f} ms", flush=True)
            for multiple in args.rates:
                send = _sender(url, args.steps)
                result = poisson_load(send, multiple / lone, args.seconds, int(multiple * 1000), args.slo * lone)
                rows.append({"server": name, "rate_multiple": multiple, **result})
                print(json.dumps(rows[-1]), flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    payload = {
        **run_metadata("serving_pipeline.py", args),
        "pipeline": PIPELINE,
        "passes": json.loads(PASSES.read_text())["passes"],
        "lone_latency_s": lone,
        "rows": rows,
        "verdicts": verdicts(rows),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving_pipeline.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / "serving_pipeline.md").write_text(markdown(payload))
    plot(payload, RESULTS / "serving_pipeline.png")
    print(markdown(payload))


def verdicts(rows: list[dict]) -> list[dict]:
    """Per rate where request-level batching misses the SLO at p95: step-level goodput (with
    admission, and without) over request-level goodput."""
    by = {(r["server"], r["rate_multiple"]): r for r in rows}
    found = []
    for multiple in dict.fromkeys(r["rate_multiple"] for r in rows):
        request_level = by[(SERVERS[1], multiple)]
        if request_level["p95"] <= request_level["slo_s"]:
            continue
        ratios = [
            by[(server, multiple)]["goodput"] / request_level["goodput"] if request_level["goodput"] else float("inf")
            for server in (SERVERS[3], SERVERS[2])
        ]
        found.append(
            {
                "rate_multiple": multiple,
                "goodput_ratio": ratios[0],
                "without_admission": ratios[1],
                "met": ratios[0] >= TARGET,
            }
        )
    return found


def markdown(payload: dict) -> str:
    slo_ms = payload["slo"] * payload["lone_latency_s"] * 1000
    lines = [
        "# Serving a DiT pipeline (dit-digits) on Ray Serve: goodput under an SLO",
        "",
        f"Produced by `{payload['command']}`. Passes: `{payload['passes']}`. Lone request: "
        f"{payload['lone_latency_s'] * 1000:.1f} ms ({payload['steps']} DDIM steps); SLO {slo_ms:.0f} ms "
        f"({payload['slo']:g}x lone). Rates in multiples of 1 / lone latency; {payload['seconds']:g} s of Poisson "
        f"arrivals per row; one replica; everything on one 2-core machine.",
        "",
        "| server | rate (x lone capacity) | req/s offered | throughput (req/s) | goodput (req/s in SLO) | p50 ms "
        "| p95 ms | mean batch rows | completed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['server']} | {r['rate_multiple']:g} | {r['rate']:.1f} | {r['throughput']:.1f} | {r['goodput']:.1f} "
            f"| {r['p50'] * 1000:.0f} | {r['p95'] * 1000:.0f} | {r['mean_batch_rows']:.1f} | "
            f"{r['completed']}/{r['requests']} |"
        )
    lines += [
        "",
        f"Target: wherever request-level batching's p95 exceeds the SLO, step-level goodput (with SLO admission, "
        f"slo_s = {1 - payload['admission_margin']:g} x the SLO) >= {TARGET}x request-level goodput.",
    ]
    if not payload["verdicts"]:
        lines.append("Request-level batching met the SLO at p95 at every rate run: the target was not tested.")
    for v in payload["verdicts"]:
        lines.append(
            f"- rate {v['rate_multiple']:g}x: step-level / request-level goodput = {v['goodput_ratio']:.2f} "
            f"(without admission {v['without_admission']:.2f}): {'met' if v['met'] else 'NOT met'}"
        )
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (goodput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in dict.fromkeys(r["server"] for r in payload["rows"]):
        members = [r for r in payload["rows"] if r["server"] == server]
        offered = [r["rate"] for r in members]
        goodput.plot(offered, [r["goodput"] for r in members], "o-", label=server)
        latency.plot(offered, [r["p95"] * 1000 for r in members], "o-", label=server)
    latency.axhline(payload["slo"] * payload["lone_latency_s"] * 1000, color="gray", linestyle="--", label="SLO")
    goodput.set(xlabel="offered load (req/s)", ylabel="goodput (req/s within the SLO)")
    latency.set(xlabel="offered load (req/s)", ylabel="p95 latency (ms)", yscale="log")
    for axis in (goodput, latency):
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
