"""The ``diffopt`` command line: ``info`` (what a captured graph holds), ``demo``,
``export`` (a reference model, optionally cached, to an ONNX bundle), ``sample``
(an exported bundle on a bundle runtime, without the model's code), ``calibrate`` (temporal
statistics of a reference model), ``report`` (a temporal-difference program's
per-layer decisions and cost per run), ``bench`` (a set of configurations measured in one
run), ``tune`` (the cheapest configuration over a quality floor) and ``serve``. Every
command takes ``--plugin MODULE`` (``util.plugins``: plugins that register passes, backends
and bundle runtimes)."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from diffopt.capture import CaptureError, capture
from diffopt.export.onnx import ExportError
from diffopt.measure.macs import summarize
from diffopt.measure.timing import interleaved_times, wait_for_device
from diffopt.models.zoo import UnknownModelError
from diffopt.passes.base import PassError
from diffopt.passes.temporal_difference import MODES
from diffopt.runtime.bundle import PROFILES
from diffopt.util.plugins import load_installed_plugins, load_plugin, loaded_plugins

SERVE_SHUTDOWN_S = 20  # diffopt serve: how long Ctrl-C waits for Ray Serve to stop its replicas


class UsageError(ValueError):
    """A command cannot run with what it was given (the message says what to change)."""


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _load_model(name: str, require_weights: bool) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, example inputs, scheduler config) for a reference model or ``simple-dit``."""
    from diffopt.models import zoo
    from diffopt.models.simple_dit import SimpleDiT

    if name == "simple-dit":
        x, t, y = zoo.example_inputs("dit-digits")
        return SimpleDiT().eval(), (x, t, y), {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}
    spec = zoo.get_spec(name)
    if zoo.weights_path(name).exists():
        model, scheduler_config = zoo.load(name)
    elif require_weights:
        raise UsageError(
            f"the weights of {name!r} are missing ({zoo.weights_path(name)}); "
            f"train them with `python scripts/train_reference.py {name}`"
        )
    else:
        model, scheduler_config = zoo.build_architecture(spec).eval(), dict(spec.scheduler)
    return model, zoo.example_inputs(name), scheduler_config


def _source(args: argparse.Namespace) -> tuple[str, object]:
    """What a command runs on: ``("zoo", name)`` for a reference model name, ``("pipeline",
    pipe)`` for ``--pipeline DIR`` or a factory that makes a pipeline, ``("bare", BareModel)``
    for a factory that returns a model and example inputs."""
    from diffopt.pipelines.loading import load_factory, load_pipeline

    given = [name for name in ("model", "pipeline", "factory") if getattr(args, name, None)]
    if len(given) != 1:
        raise UsageError("name exactly one of: a reference model, --pipeline DIR, --model package.module:function")
    if args.model:
        return "zoo", args.model
    made = load_pipeline(args.pipeline) if args.pipeline else load_factory(args.factory)
    if hasattr(made, "components"):
        made.set_progress_bar_config(disable=True)
        return "pipeline", made
    return "bare", made


def _pipeline_calls(args: argparse.Namespace, pipe) -> list[dict]:
    """The calls of ``--calls FILE`` (or calls made up from the pipeline's text encoder or
    class labels), with ``--steps`` when given."""
    from diffopt.pipelines.loading import default_calls, load_calls

    calls = load_calls(args.calls) if args.calls else default_calls(pipe, args.num_calls)
    if args.steps is not None:
        calls = [{**call, "num_inference_steps": args.steps} for call in calls]
    return calls


def _run_enabled(pipe, call: dict, passes=()) -> object:
    """Enable ``pipe`` with ``passes``, run ``call`` once, and return the program it captured."""
    from diffopt.pipelines import _components, enable
    from diffopt.pipelines.tuning import run_call

    enable(pipe, passes)
    run_call(pipe, call)
    return _components(pipe)[0].programs[-1]


def _batch_one(captured, inputs: tuple | dict) -> tuple[torch.Tensor, ...]:
    """A captured graph's inputs, in its signature's order, cut to the first sample."""
    from diffopt.capture import flatten_argument

    if isinstance(inputs, dict):
        values = {k: v for name, value in inputs.items() for k, v in flatten_argument(name, value).items()}
        inputs = tuple(values[name] for name in captured.signature.input_names)
    batch = inputs[0].shape[0]
    return tuple(v[:1] if v.dim() > 0 and v.shape[0] == batch else v for v in inputs)


def command_info(args: argparse.Namespace) -> None:
    kind, source = _source(args)
    if kind == "pipeline":
        program = _run_enabled(source, _pipeline_calls(args, source)[0])
        captured, example = program.graph, program.example
    else:
        model, inputs = (source.model, source.inputs) if kind == "bare" else _load_model(source, False)[:2]
        captured = capture(model, inputs)
        example = _batch_one(captured, inputs)
    summary = summarize(captured.module, example)
    print(f"model      {captured.model_class}")
    print(
        f"signature  latent={captured.signature.latent} timestep={captured.signature.timestep} "
        f"conditions={list(captured.signature.conditions)}"
    )
    print(f"MACs/call  {summary.total_macs / 1e6:.2f} M (batch 1)")
    linear_macs = sum(layer.macs for layer in summary.linear_layers)
    print(
        f"linear     {len(summary.linear_layers)} layers, {linear_macs / 1e6:.2f} M MACs "
        f"({100 * linear_macs / max(summary.total_macs, 1):.1f}% of all)"
    )
    print("blocks     " + ("; ".join(f"{c}: {len(b)}" for c, b in summary.blocks.items()) or "none found"))
    for module, source in loaded_plugins().items():
        print(f"plugin     {module} ({source}): registers {', '.join(_registered_by(module)) or 'nothing'}")
    print("\nops (top 15):")
    print(format_table(["op", "count"], summary.op_counts.most_common(15)))
    if args.layers:
        print("\nlinear layers:")
        rows = [
            (layer.module, layer.op, "x".join(map(str, layer.weight_shape)), f"{layer.macs / 1e3:.1f}")
            for layer in summary.linear_layers
        ]
        print(format_table(["module", "op", "weight", "kMACs"], rows))


def _registered_by(module: str) -> list[str]:
    """What classes of ``module`` registered: ``pass X``, ``backend Y``, ``runtime Z``."""
    from diffopt.passes.registry import registered_passes
    from diffopt.runtime.backends import registered_backends
    from diffopt.runtime.runtimes import registered_runtimes

    registries = {"pass": registered_passes(), "backend": registered_backends(), "runtime": registered_runtimes()}
    return [
        f"{kind} {name}"
        for kind, known in registries.items()
        for name, cls in known.items()
        if cls.__module__ == module
    ]


def _plugin_options() -> str:
    """The ``--plugin`` options that load this run's command-line plugins again (installed ones load themselves)."""
    return "".join(f" --plugin {module}" for module, source in loaded_plugins().items() if source == "--plugin")


# the strongest stack measured on dit-digits: forecasting the whole block span (order 1, period 4, 5 warm-up
# steps) is the fastest configuration over 45 dB in benchmarks/results/forecast_dit-digits.md (49.5 dB, 0.32 of
# the MACs) and in a DiTPipeline (benchmarks/results/pipelines.md); exported, it runs on onnxruntime
DEMO_FORECAST = {"order": 1, "period": 4, "warmup": 5, "targets": "blocks"}


def command_demo(args: argparse.Namespace) -> None:
    import statistics
    import tempfile

    from diffopt.evaluation.metrics.grid import save_grid
    from diffopt.measure.fidelity import psnr
    from diffopt.models.zoo import NULL_CLASS
    from diffopt.optimize import optimize
    from diffopt.passes.forecast_cache import ForecastCachePass
    from diffopt.sampling.schedulers import make_scheduler
    from diffopt.sampling.sequential import Sampler

    model, inputs, scheduler_config = _load_model(args.model, require_weights=True)
    forecast = "forecast cache (block span, o1 p4 w5)"
    runners = {"plain model, torch eager fp32": model}
    runners[f"{forecast}, torch"] = optimize(capture(model, inputs), [ForecastCachePass(**DEMO_FORECAST)])
    with tempfile.TemporaryDirectory() as directory:
        try:
            from diffopt.export import to_onnx
            from diffopt.runtime.runtimes import load_bundle

            print("exporting the forecast program to an ONNX bundle ...", flush=True)
            to_onnx(runners[f"{forecast}, torch"], Path(directory) / "bundle", scheduler_config=scheduler_config)
            runners[f"{forecast}, exported, onnxruntime"] = load_bundle(Path(directory) / "bundle")
        except ImportError as error:
            print(f"(no onnxruntime row: {error}; pip install -e '.[onnx]')")
        labels = torch.arange(args.samples) % 10
        shape = (args.samples, *inputs[0].shape[1:])
        sampler = Sampler(
            make_scheduler(scheduler_config, num_steps=args.steps),
            progress=False,
            guidance_scale=args.guidance,
            null_conditions=(torch.tensor(NULL_CLASS),),
        )
        print(
            f"{args.model}: {args.samples} samples, {args.steps} DDIM steps, guidance {args.guidance}; "
            f"{args.repeats} interleaved timed runs per row after a warm-up run, measured now on this machine "
            f"({torch.get_num_threads()} threads)",
            flush=True,
        )
        samples = {}

        def timed(name: str, denoiser) -> Callable[[int], None]:
            def run(_: int) -> None:
                samples[name] = sampler.sample(denoiser, (labels,), shape=shape, seed=args.seed)

            return run

        times = interleaved_times({name: timed(name, d) for name, d in runners.items()}, args.repeats)
    baseline_name = next(iter(runners))
    baseline = statistics.median(times[baseline_name])
    rows = [
        (
            name,
            f"{statistics.median(seconds):.3f}",
            f"{baseline / statistics.median(seconds):.2f}x",
            f"{psnr(samples[name], samples[baseline_name]):.1f}",
        )
        for name, seconds in times.items()
    ]
    print(format_table(["runner", "median s", "speed-up", "PSNR vs plain (dB)"], rows))
    best = list(runners)[-1]
    save_grid(torch.cat([samples[baseline_name][:10], samples[best][:10]]), args.out, columns=min(10, args.samples))
    print(
        f"\n{args.out}: the plain model's samples (top) and {best}'s (bottom), from the same noise.\n"
        "Every number above was measured just now; the committed measurements (more samples, FD, "
        "accuracy) are in benchmarks/results/forecast_dit-digits.md, pipelines.md and runtime_comparison.md."
    )


def _pass_file(path: str) -> tuple[list, dict]:
    """The passes of a pass file (``diffopt tune`` writes one) and its other fields."""
    from diffopt.passes.registry import load_passes

    try:
        return load_passes(path)
    except ValueError as error:
        raise UsageError(f"--passes {path}: {error}") from None


def command_export(args: argparse.Namespace) -> None:
    from diffopt.export import to_onnx
    from diffopt.ir.statistics import CalibrationStatistics
    from diffopt.optimize import optimize
    from diffopt.passes.temporal_difference import TemporalDifferencePass

    passes, extra = _pass_file(args.passes) if args.passes else ([], {})
    if args.temporal_difference:
        passes.append(TemporalDifferencePass(args.temporal_difference))
    calibration = CalibrationStatistics.load(args.calibration) if args.calibration else None
    kind, source = _source(args)
    started = time.perf_counter()
    if kind == "pipeline":
        from diffopt.pipelines import export as export_pipeline

        if calibration is not None:
            raise UsageError("--calibration is for reference models; a pipeline's passes take none here")
        call = _pipeline_calls(args, source)[0]
        if "steps" in extra and args.steps is None:
            call["num_inference_steps"] = extra["steps"]
        _run_enabled(source, call, passes)
        manifest = export_pipeline(source, args.out, profile=args.profile)
        name = f"the {source.__class__.__name__} denoiser"
    else:
        if kind == "bare":
            model, inputs, scheduler_config = source.model, source.inputs, source.scheduler_config
        else:
            model, inputs, scheduler_config = _load_model(source, require_weights=True)
        optimized = optimize(capture(model, inputs), passes, calibration=calibration)
        manifest = to_onnx(optimized, args.out, profile=args.profile, scheduler_config=scheduler_config)
        name = args.model or args.factory
    print(
        f"exported {name} (passes: {', '.join(map(str, passes)) or 'none'}) to {args.out} "
        f"in {time.perf_counter() - started:.1f} s: variants {list(manifest.variants)}, {len(manifest.state)} state "
        f"tensors, profile {manifest.profile}"
    )


def command_sample(args: argparse.Namespace) -> None:
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


def _digits_run(args: argparse.Namespace):
    """(baseline program, DDIM sampler, class-label conditions, latent shape) for a reference model."""
    from diffopt.optimize import optimize
    from diffopt.sampling.schedulers import make_scheduler
    from diffopt.sampling.sequential import Sampler

    model, inputs, scheduler_config = _load_model(args.model, require_weights=True)
    program = optimize(capture(model, inputs)).program
    sampler = Sampler(make_scheduler(scheduler_config, "ddim", args.steps), progress=False)
    return program, sampler, (torch.arange(args.samples) % 10,), (args.samples, *inputs[0].shape[1:])


def command_calibrate(args: argparse.Namespace) -> None:
    from diffopt.measure.calibration import calibrate

    program, sampler, conditions, shape = _digits_run(args)
    statistics = calibrate(program, sampler, conditions, shape, seeds=tuple(args.seeds))
    statistics.save(args.out)
    print(statistics.temporal.report(per_layer=args.layers))
    print(
        f"\ncalibration of {args.model} ({args.samples} samples x {len(args.seeds)} runs, {args.steps} DDIM steps) "
        f"written to {args.out}"
    )


def command_report(args: argparse.Namespace) -> None:
    from diffopt.ir.statistics import CalibrationStatistics
    from diffopt.measure.cost import measure_run_cost
    from diffopt.measure.defo_profile import profile_layers
    from diffopt.optimize import optimize
    from diffopt.passes.defo import DefoPass
    from diffopt.passes.temporal_difference import TemporalDifferencePass, layer_decisions

    program, sampler, conditions, shape = _digits_run(args)
    calibration = CalibrationStatistics.load(args.calibration) if args.calibration else None
    difference = TemporalDifferencePass(args.mode, bits=args.bits, row_threshold=args.row_threshold)
    passes = [difference]
    if args.defo:
        print(f"profiling every layer group in full and delta form at batch {args.samples} ...")
        profile = profile_layers(program, difference, sampler, conditions, shape, calibration=calibration)
        passes = [DefoPass(profile, difference, cost=args.defo)]
        print(f"cost model agrees with the measured latencies on {profile.agreement():.0%} of layers")
    optimized = optimize(program, passes, calibration=calibration).program
    rows = [(layer, mode, reason or "") for layer, (mode, reason) in layer_decisions(optimized).items()]
    print(format_table(["layer", "mode", "reason"], rows))
    costs = {
        "unoptimized": measure_run_cost(program, sampler, conditions, shape),
        str(difference): measure_run_cost(optimized, sampler, conditions, shape),
    }
    print(f"\ncost per sampling run ({args.steps} DDIM steps, batch {args.samples}):")
    print(
        format_table(
            ["program", "GMACs", "linear G-bit-ops", "state MB", "peak activations MB"],
            [
                (
                    name,
                    f"{c.macs / 1e9:.2f}",
                    f"{c.linear_bit_operations / 1e9:.0f}",
                    f"{c.state_bytes / 1e6:.2f}",
                    f"{c.peak_activation_bytes / 1e6:.2f}",
                )
                for name, c in costs.items()
            ],
        )
    )


def _bounded(kind: type, minimum: float, name: str):
    """An argparse type: ``kind`` (int or float), finite and >= ``minimum``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {'an integer' if kind is int else 'a number'}, found {text!r}"
            ) from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, found {text}")
        return value

    return parse


def _output_file(text: str) -> str:
    """An argparse type: a file path whose directory exists (checked before any long work)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give a file name")
    if not path.parent.exists():
        raise argparse.ArgumentTypeError(f"the directory {path.parent} does not exist: create it first")
    return text


def _bundle_directory(text: str) -> str:
    """An argparse type: a bundle path whose parent directory exists (checked before any long work)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    if not path.parent.exists():
        raise argparse.ArgumentTypeError(f"the directory {path.parent} does not exist: create it first")
    return text


def _bench_file(path: str):
    """(model, title, configurations) of a bench file; a malformed one is a user error."""
    from diffopt.evaluation.bench import load_configurations

    try:
        return load_configurations(path)
    except ValueError as error:
        raise UsageError(str(error)) from None


def command_bench(args: argparse.Namespace) -> None:
    from diffopt.evaluation.bench import run_bench, write_results

    if args.pipeline or args.factory:
        return _bench_pipeline(args)
    model, title, configurations = _bench_file(args.config)
    if model is None:
        raise UsageError(f'{args.config} names no reference model: add "model" or give --pipeline DIR / --model')
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in configurations})
        if unknown:
            raise UsageError(f"--only names no configuration of {args.config}: {unknown}")
        configurations = [c for i, c in enumerate(configurations) if i == 0 or c.name in args.only]
    summary = run_bench(
        model,
        configurations,
        samples=args.samples,
        timing_batch=args.timing_batch,
        repeats=args.repeats,
        timing_only=args.timing_only,
        reference_seeds=args.reference_seeds,
    )
    command = (
        f"diffopt bench {args.config} --out {args.out} --samples {args.samples} --timing-batch {args.timing_batch} "
        f"--repeats {args.repeats} --reference-seeds {args.reference_seeds}"
        + (" --timing-only" if args.timing_only else "")
        + (" --only " + " ".join(f'"{name}"' for name in args.only) if args.only else "")
        + _plugin_options()
    )
    write_results({**summary, "plugins": loaded_plugins()}, args.out, title, command)
    print(f"wrote {args.out}.json, .md" + ("" if args.timing_only else ", .png"))


def _bench_pipeline(args: argparse.Namespace) -> None:
    """``bench --pipeline``/``--model``: the bench file's pass configurations on a pipeline's calls."""
    import json

    from diffopt.pipelines.tuning import compare
    from diffopt.util.files import write_text

    kind, source = _source(args)
    if kind != "pipeline":
        raise UsageError("bench --model runs pipeline calls: the factory must return a diffusers pipeline")
    candidates = [c for c in _candidates(args.config) if not args.only or c.name in args.only]
    summary = compare(source, _pipeline_calls(args, source), candidates, repeats=args.repeats)
    summary["command"] = (
        f"diffopt bench {args.config} --out {args.out} --repeats {args.repeats}"
        + (f" --pipeline {args.pipeline}" if args.pipeline else f" --model {args.factory}")
        + (f" --calls {args.calls}" if args.calls else "")
        + (f" --steps {args.steps}" if args.steps is not None else "")
        + _plugin_options()
    )
    summary["plugins"] = loaded_plugins()
    write_text(Path(f"{args.out}.json"), json.dumps(summary, indent=2, default=str))
    rows = [
        (r["name"], r["steps"], f"{r['mac_fraction']:.3f}", f"{r['psnr']:.1f}", f"{1 / r['time_fraction']:.2f}x")
        for r in summary["rows"]
    ]
    table = format_table(["configuration", "steps", "MACs vs plain", "PSNR vs plain (dB)", "speed-up"], rows)
    lines = [f"# diffopt bench on {summary['model']}", "", f"`{summary['command']}`", "", "```", table, "```"]
    write_text(Path(f"{args.out}.md"), "\n".join(lines) + "\n")
    print(table)
    print(f"wrote {args.out}.json, .md" + (f"; skipped: {summary['skipped']}" if summary["skipped"] else ""))


def _candidates(path: str):
    """The configurations of a bench file, as search candidates (those with passes)."""
    from diffopt.measure.search import Candidate

    configurations = _bench_file(path)[2]
    return [Candidate(c.name, c.passes, c.steps, c.family) for c in configurations if c.passes is not None]


def command_tune(args: argparse.Namespace) -> None:
    from diffopt.measure.search import format_summary, save

    kind, source = _source(args)
    options = " ".join(
        f"--{name.replace('_', '-')} {value}"
        for name, value in vars(args).items()
        if name in ("pipeline", "factory", "calls", "steps", "min_psnr", "budget", "cost", "candidates", "out")
        and value is not None
    )
    try:
        if kind == "pipeline":
            from diffopt.pipelines import tune

            candidates = _candidates(args.candidates) if args.candidates else None
            calls = _pipeline_calls(args, source)
            summary = tune(source, calls, args.min_psnr, budget=args.budget, cost=args.cost, candidates=candidates)
        elif kind == "zoo":
            from diffopt.evaluation.tune import tune

            summary = tune(
                source,
                args.min_psnr,
                budget=args.budget,
                candidates=_bench_file(args.candidates)[2] if args.candidates else None,
                cost=args.cost,
                samples=args.samples,
                validation_samples=args.validation_samples,
            )
            options += f" --samples {args.samples} --validation-samples {args.validation_samples}"
        else:
            raise UsageError("tune scores whole sampling runs: give a pipeline (--pipeline, or a factory making one)")
    except ValueError as error:  # nothing meets the floor, or nothing validates
        raise UsageError(str(error)) from None
    summary["command"] = f"diffopt tune {args.model or ''} {options}{_plugin_options()}".replace("  ", " ")
    summary["plugins"] = loaded_plugins()
    passes = save(summary, args.out)
    print(format_summary(summary))
    print(f"wrote {args.out}.json, {args.out}.png and the chosen passes to {passes}")


# what a command may raise for a user's input: every library error (bundle, capture, export, input, pass and
# state errors, unknown models, bad values) and unreadable files; each becomes exit 2 with one line
USER_ERRORS = (ValueError, CaptureError, ExportError, PassError, UnknownModelError, OSError)


def command_serve(args: argparse.Namespace) -> None:
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


def _add_sources(parser: argparse.ArgumentParser, model_help: str | None) -> None:
    """The model options of ``info``, ``export``, ``tune`` and ``bench``: a reference model
    name (positional, where ``model_help`` is given), a saved pipeline or a factory, and the
    pipeline calls that capture and score it."""
    if model_help is not None:
        parser.add_argument("model", nargs="?", help=model_help)
    else:
        parser.set_defaults(model=None)
    parser.add_argument("--pipeline", metavar="DIR", help="a diffusers pipeline saved with save_pretrained (offline)")
    parser.add_argument(
        "--model",
        dest="factory",
        metavar="PACKAGE.MODULE:FUNCTION",
        help="a function returning a diffusers pipeline, or (model, example_inputs[, scheduler_config])",
    )
    parser.add_argument(
        "--calls", metavar="FILE", help="pipeline call arguments: a .json or .pt list of dicts (with 'seed')"
    )
    parser.add_argument(
        "--num-calls", type=_bounded(int, 1, "--num-calls"), default=4, help="calls made up without --calls"
    )
    parser.add_argument(
        "--steps", type=_bounded(int, 2, "--steps"), default=None, help="num_inference_steps of every pipeline call"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``diffopt`` parser: every command with its options (``scripts/cli_docs.py`` writes
    ``docs/cli.md`` from it)."""
    parser = argparse.ArgumentParser(prog="diffopt", description="graph compiler for diffusion denoisers")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="summarise a captured denoiser graph")
    _add_sources(info, "reference model name (dit-digits, unet-digits, dit-digits-flow) or simple-dit")
    info.add_argument("--layers", action="store_true", help="list every linear layer")
    info.set_defaults(run=command_info)
    demo = commands.add_parser("demo", help="optimize a shipped denoiser, sample, compare before/after")
    demo.add_argument("--model", default="dit-digits")
    demo.add_argument("--steps", type=_bounded(int, 1, "--steps"), default=50)
    demo.add_argument("--samples", type=_bounded(int, 1, "--samples"), default=20)
    demo.add_argument("--guidance", type=_bounded(float, 0.0, "--guidance"), default=1.0)
    demo.add_argument("--seed", type=_bounded(int, 0, "--seed"), default=0)
    demo.add_argument("--repeats", type=_bounded(int, 1, "--repeats"), default=3, help="timed runs per row")
    demo.add_argument("--out", type=_output_file, default="demo.png", help="PNG grid: plain (top) vs optimized")
    demo.set_defaults(run=command_demo)
    export = commands.add_parser("export", help="export a shipped denoiser (optionally cached) to an ONNX bundle")
    _add_sources(export, "reference model name")
    export.add_argument("out", type=_bundle_directory, help="bundle directory to write")
    export.add_argument("--passes", metavar="FILE", help="a pass file (what `diffopt tune` writes)")
    export.add_argument("--profile", choices=PROFILES, default=PROFILES[0])
    export.add_argument(
        "--temporal-difference",
        choices=("exact", "dynamic", "difference"),
        help="Ditto layers: dynamic = int8 differences on onnxruntime's integer kernels; "
        "difference = static int8 scales (TensorRT profile), needs --calibration",
    )
    export.add_argument("--calibration", help="from `diffopt calibrate` (for --temporal-difference difference)")
    export.set_defaults(run=command_export)
    sample = commands.add_parser("sample", help="sample class-conditional digits from a bundle (onnxruntime)")
    sample.add_argument("bundle")
    sample.add_argument("--runtime", default="onnxruntime", help="the bundle runtime (registered name)")
    sample.add_argument("--steps", type=_bounded(int, 1, "--steps"), default=50)
    sample.add_argument("--samples", type=_bounded(int, 1, "--samples"), default=20)
    sample.add_argument("--seed", type=_bounded(int, 0, "--seed"), default=0)
    sample.add_argument("--out", type=_output_file, default="samples.png", help="PNG grid of the samples")
    sample.set_defaults(run=command_sample)
    calibrate = commands.add_parser(
        "calibrate",
        help="temporal calibration: how much linear-op inputs change between steps (Ditto statistics, static scales)",
    )
    calibrate.add_argument("model", help="reference model name")
    calibrate.add_argument("--out", type=_output_file, default="calibration.json")
    calibrate.add_argument("--samples", type=_bounded(int, 1, "--samples"), default=8, help="samples per run")
    calibrate.add_argument(
        "--steps",
        type=_bounded(int, 2, "--steps"),
        default=50,
        help="sampling steps (>= 2: statistics compare consecutive steps)",
    )
    calibrate.add_argument(
        "--seeds", type=_bounded(int, 0, "--seeds"), nargs="+", default=[0], help="one calibration run per seed"
    )
    calibrate.add_argument("--layers", action="store_true", help="one line per layer")
    calibrate.set_defaults(run=command_calibrate)
    report = commands.add_parser(
        "report",
        help="temporal-difference program: each layer's mode and why, and "
        "the cost per run (MACs, bit-operations, state, peak memory)",
    )
    report.add_argument("model", help="reference model name")
    report.add_argument("--calibration", help="from `diffopt calibrate` (needed by every mode but exact)")
    report.add_argument("--mode", choices=MODES, default="exact")
    report.add_argument("--bits", type=_bounded(int, 2, "--bits"), default=8)
    report.add_argument("--row-threshold", type=_bounded(float, 0.0, "--row-threshold"), default=None)
    report.add_argument("--defo", choices=("model", "measured"), help="decide full/delta per layer (Defo)")
    report.add_argument("--samples", type=_bounded(int, 1, "--samples"), default=4, help="batch of the costed run")
    report.add_argument("--steps", type=_bounded(int, 2, "--steps"), default=50)
    report.set_defaults(run=command_report)
    bench = commands.add_parser(
        "bench", help="run configurations (passes x backends x step counts, baselines) on a model in one run"
    )
    bench.add_argument("config", help="bench file, e.g. benchmarks/configs/caching_dit-digits.json")
    _add_sources(bench, None)
    bench.add_argument("--out", type=_output_file, required=True, help="results stem: writes .json, .md, .png")
    bench.add_argument("--samples", type=_bounded(int, 10, "--samples"), default=600)
    bench.add_argument("--timing-batch", type=_bounded(int, 1, "--timing-batch"), default=50)
    bench.add_argument("--repeats", type=_bounded(int, 1, "--repeats"), default=3)
    bench.add_argument("--timing-only", action="store_true", help="wall time only, no quality runs")
    bench.add_argument(
        "--reference-seeds",
        type=_bounded(int, 1, "--reference-seeds"),
        default=3,
        help="noise seeds of the reference's FD (its seed noise)",
    )
    bench.add_argument("--only", nargs="+", help="run only these configurations (and the first, the reference)")
    bench.set_defaults(run=command_bench)
    tune = commands.add_parser(
        "tune", help="the cheapest configuration over a PSNR floor, or the best within a MAC budget, validated"
    )
    _add_sources(tune, "reference model name (dit-digits, unet-digits)")
    goal = tune.add_mutually_exclusive_group(required=True)
    goal.add_argument("--min-psnr", type=_bounded(float, 0.0, "--min-psnr"), help="the quality floor (dB)")
    goal.add_argument("--budget", type=float, help="the most MACs, as a fraction of the plain run's (plan refined)")
    tune.add_argument("--cost", choices=("macs", "time"), default="macs")
    tune.add_argument("--samples", type=_bounded(int, 10, "--samples"), default=100, help="calibration samples")
    tune.add_argument("--validation-samples", type=_bounded(int, 10, "--validation-samples"), default=200)
    tune.add_argument("--candidates", help="bench file of candidates (default: a built-in search space)")
    tune.add_argument("--out", type=_output_file, default="tune", help="results stem: .json, .png, .passes.json")
    tune.set_defaults(run=command_tune)
    serve = commands.add_parser("serve", help="serve a bundle over HTTP on Ray Serve (step-level continuous batching)")
    serve.add_argument("bundle", help="an exported bundle directory (with its noise-schedule config)")
    serve.add_argument("--replicas", type=_bounded(int, 1, "--replicas"), default=1)
    serve.add_argument("--max-batch", type=_bounded(int, 1, "--max-batch"), default=32, help="rows per forward")
    serve.add_argument("--max-waiting", type=_bounded(int, 1, "--max-waiting"), default=64, help="queued requests")
    serve.add_argument("--null-class", type=int, help="the null class label, for guided requests")
    serve.add_argument("--threads", type=_bounded(int, 1, "--threads"), help="onnxruntime threads per replica")
    serve.add_argument(
        "--cpus-per-replica",
        type=_bounded(float, 0.0, "--cpus-per-replica"),
        default=0.0,
        help="CPUs Ray reserves per replica (on a cluster: set it to --threads so replicas spread over nodes)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    serve.add_argument("--port", type=_bounded(int, 1, "--port"), default=8000)
    serve.add_argument("--address", help="a Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    serve.set_defaults(run=command_serve)
    for command in commands.choices.values():
        command.add_argument(
            "--plugin",
            action="append",
            default=[],
            metavar="MODULE",
            help="import this module first (it registers passes or backends); also DIFFOPT_PLUGINS, entry points",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        load_installed_plugins()
        for module in args.plugin:
            load_plugin(module)
        args.run(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        parser.exit(2, f"diffopt {args.command}: error: {message}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
