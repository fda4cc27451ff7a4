"""``diffopt serve``: a bundle over HTTP on Ray Serve, with step-level continuous batching."""

from __future__ import annotations

import argparse
import signal
import threading

import torch

from diffopt.cli.common import UsageError, bounded


def add_parser(commands) -> None:
    """The ``serve`` command and its options."""
    parser = commands.add_parser("serve", help="serve a bundle over HTTP on Ray Serve (step-level continuous batching)")
    parser.add_argument("bundle", help="an exported bundle directory (with its noise-schedule config)")
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
    """Serve a bundle on Ray Serve until interrupted (``serving.deployment``)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError('`diffopt serve` needs Ray Serve: pip install -e ".[serve]"') from None
    from diffopt.runtime.bundle import Manifest
    from diffopt.serving.deployment import deployment

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
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or a kill: stop serving and take Ray down with us
        signal.signal(number, lambda *_: stop.set())
    ray.init(address=args.address, include_dashboard=False)  # RAY_ADDRESS or --address: an existing cluster
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, route_prefix="/")
        print(
            f"serving {args.bundle} on http://{args.host}:{args.port}/sample ({args.replicas} replica(s)); "
            f"Ctrl-C stops",
            flush=True,
        )
        stop.wait()
        print("stopping: shutting Ray Serve and Ray down", flush=True)
        shutdown = threading.Thread(target=serve.shutdown, daemon=True)
        shutdown.start()
        shutdown.join(timeout=SERVE_SHUTDOWN_S)  # a replica stuck in a forward must not hold Ctrl-C up
    finally:
        ray.shutdown()  # the Ray processes this command started (none of an existing cluster's)
