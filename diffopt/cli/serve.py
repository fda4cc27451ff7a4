"""``diffopt serve``: a bundle (``POST /sample``) or a saved diffusers pipeline (OpenAI's
``POST /v1/images/generations``) over HTTP on Ray Serve, with step-level batching."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

import torch

from diffopt.cli.common import UsageError, bounded, pass_file


def add_parser(commands) -> None:
    """The ``serve`` command and its options."""
    parser = commands.add_parser(
        "serve", help="serve a bundle or a saved pipeline over HTTP on Ray Serve (step-level continuous batching)"
    )
    parser.add_argument("bundle", nargs="?", help="an exported bundle directory (with its noise-schedule config)")
    parser.add_argument("--pipeline", help="a pipeline saved with save_pretrained: serve prompts (OpenAI images API)")
    parser.add_argument("--passes", help="with --pipeline: a pass file (diffopt tune writes one) to enable it with")
    parser.add_argument("--bundle", dest="pipeline_bundle", help="with --pipeline: run its denoiser from this bundle")
    parser.add_argument(
        "--slo",
        type=bounded(float, 0.001, "--slo"),
        help="with --pipeline: a latency SLO in seconds; a request that cannot finish within it gets 503 at once",
    )
    parser.add_argument(
        "--call-defaults",
        type=json.loads,
        help="with --pipeline: JSON arguments of every call, e.g. '{\"height\": 512}'",
    )
    parser.add_argument("--replicas", type=bounded(int, 1, "--replicas"), default=1)
    parser.add_argument("--max-batch", type=bounded(int, 1, "--max-batch"), default=32, help="rows per forward")
    parser.add_argument("--max-waiting", type=bounded(int, 1, "--max-waiting"), default=64, help="queued requests")
    parser.add_argument("--null-class", type=int, help="the null class label, for guided requests")
    parser.add_argument("--threads", type=bounded(int, 1, "--threads"), help="onnxruntime threads per replica")
    parser.add_argument(
        "--cpus-per-replica",
        type=bounded(float, 0.0, "--cpus-per-replica"),
        default=0.0,
        help="CPUs Ray reserves per replica (on a cluster: set it to --threads so replicas spread over nodes)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=bounded(int, 1, "--port"), default=8000)
    parser.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    parser.set_defaults(run=run)


SERVE_SHUTDOWN_S = 20  # diffopt serve: how long Ctrl-C waits for Ray Serve to stop its replicas


def run(args: argparse.Namespace) -> None:
    """Serve a bundle or a pipeline on Ray Serve until interrupted (``serving.deployment``,
    ``serving.pipeline_server``)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError('`diffopt serve` needs Ray Serve: pip install -e ".[serve]"') from None
    app, where = _pipeline_app(args) if args.pipeline else _bundle_app(args)
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or a kill: stop serving and take Ray down with us
        signal.signal(number, lambda *_: stop.set())
    ray.init(address=args.address, include_dashboard=False)  # RAY_ADDRESS or --address: an existing cluster
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, route_prefix="/")
        print(
            f"serving {args.pipeline or args.bundle} on http://{args.host}:{args.port}{where} ({args.replicas} "
            f"replica(s)); Ctrl-C stops",
            flush=True,
        )
        stop.wait()
        print("stopping: shutting Ray Serve and Ray down", flush=True)
        shutdown = threading.Thread(target=serve.shutdown, daemon=True)
        shutdown.start()
        shutdown.join(timeout=SERVE_SHUTDOWN_S)  # a replica stuck in a forward must not hold Ctrl-C up
    finally:
        ray.shutdown()  # the Ray processes this command started (none of an existing cluster's)


def _bundle_app(args: argparse.Namespace):
    """(application, path) of a bundle: ``POST /sample``."""
    from diffopt.runtime.bundle import Manifest
    from diffopt.serving.deployment import deployment

    if args.bundle is None:
        raise UsageError("diffopt serve: give a bundle directory, or --pipeline DIR")
    if args.passes or args.pipeline_bundle or args.call_defaults or args.slo:
        raise UsageError("--passes, --bundle, --call-defaults and --slo go with --pipeline DIR")
    if Manifest.load(args.bundle).scheduler is None:  # a broken bundle is refused before Ray starts
        raise UsageError(f"{args.bundle} has no noise-schedule config: export it with scheduler_config=...")
    null = (torch.tensor(args.null_class),) if args.null_class is not None else None
    app = deployment(
        args.bundle,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        null_conditions=null,
        num_replicas=args.replicas,
        threads=args.threads,
        cpus_per_replica=args.cpus_per_replica,
    )
    return app, "/sample"


def _pipeline_app(args: argparse.Namespace):
    """(application, path) of a saved pipeline: OpenAI's images endpoint."""
    from diffopt.serving.images_api import PATH
    from diffopt.serving.pipeline_server import pipeline_deployment

    if args.bundle is not None:
        raise UsageError(f"--pipeline {args.pipeline}: its bundle goes in --bundle, not as {args.bundle!r}")
    if args.passes and args.pipeline_bundle:
        raise UsageError("--passes or --bundle, not both: a bundle's passes were applied when it was exported")
    if not (Path(args.pipeline) / "model_index.json").is_file():
        raise UsageError(f"--pipeline {args.pipeline}: not a pipeline saved with save_pretrained (no model_index.json)")
    if args.passes:
        pass_file(args.passes)  # a bad pass file is refused before Ray starts
    if args.call_defaults is not None and not isinstance(args.call_defaults, dict):
        raise UsageError(f"--call-defaults: a JSON object of call arguments, found {args.call_defaults!r:.60}")
    app = pipeline_deployment(
        args.pipeline,
        passes=args.passes,
        bundle=args.pipeline_bundle,
        call_defaults=args.call_defaults,
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        num_replicas=args.replicas,
        threads=args.threads,
        cpus_per_replica=args.cpus_per_replica,
        slo_s=args.slo,
    )
    return app, PATH
