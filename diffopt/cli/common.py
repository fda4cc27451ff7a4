"""What the ``diffopt`` commands share: the model sources (a reference model, a saved pipeline,
a factory) and their calls, argument types that name the option, bench and pass files, and
the recorded ``--plugin`` options."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from diffopt.capture import capture
from diffopt.util.plugins import loaded_plugins


class UsageError(ValueError):
    """A command cannot run with what it was given (the message says what to change)."""


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_model(name: str, require_weights: bool) -> tuple[torch.nn.Module, tuple, dict]:
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


def source_of(args: argparse.Namespace) -> tuple[str, object]:
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


def pipeline_calls(args: argparse.Namespace, pipe) -> list[dict]:
    """The calls of ``--calls FILE`` (or calls made up from the pipeline's text encoder or
    class labels), with ``--steps`` when given."""
    from diffopt.pipelines.loading import default_calls, load_calls

    calls = load_calls(args.calls) if args.calls else default_calls(pipe, args.num_calls)
    if args.steps is not None:
        calls = [{**call, "num_inference_steps": args.steps} for call in calls]
    return calls


def run_enabled(pipe, call: dict, passes=()) -> object:
    """Enable ``pipe`` with ``passes``, run ``call`` once, and return the program it captured."""
    from diffopt.pipelines import _components, enable
    from diffopt.pipelines.workload import run_call

    enable(pipe, passes)
    run_call(pipe, call)
    return _components(pipe)[0].programs[-1]


def batch_one(captured, inputs: tuple | dict) -> tuple[torch.Tensor, ...]:
    """A captured graph's inputs, in its signature's order, cut to the first sample."""
    from diffopt.capture import flatten_argument

    if isinstance(inputs, dict):
        values = {k: v for name, value in inputs.items() for k, v in flatten_argument(name, value).items()}
        inputs = tuple(values[name] for name in captured.signature.input_names)
    batch = inputs[0].shape[0]
    return tuple(v[:1] if v.dim() > 0 and v.shape[0] == batch else v for v in inputs)


def plugin_options() -> str:
    """The ``--plugin`` options that load this run's command-line plugins again (installed ones load themselves)."""
    return "".join(f" --plugin {module}" for module, source in loaded_plugins().items() if source == "--plugin")


def pass_file(path: str) -> tuple[list, dict]:
    """The passes of a pass file (``diffopt tune`` writes one) and its other fields."""
    from diffopt.passes.registry import load_passes

    try:
        return load_passes(path)
    except ValueError as error:
        raise UsageError(f"--passes {path}: {error}") from None


def digits_run(args: argparse.Namespace):
    """(baseline program, DDIM sampler, class-label conditions, latent shape) for a reference model."""
    from diffopt.optimize import optimize
    from diffopt.sampling.schedulers import make_scheduler
    from diffopt.sampling.sequential import Sampler

    model, inputs, scheduler_config = load_model(args.model, require_weights=True)
    program = optimize(capture(model, inputs)).program
    sampler = Sampler(make_scheduler(scheduler_config, "ddim", args.steps), progress=False)
    return program, sampler, (torch.arange(args.samples) % 10,), (args.samples, *inputs[0].shape[1:])


def bounded(kind: type, minimum: float, name: str):
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


def output_file(text: str) -> str:
    """An argparse type: a file path whose directory exists (checked before any long work)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give a file name")
    if not path.parent.exists():
        raise argparse.ArgumentTypeError(f"the directory {path.parent} does not exist: create it first")
    return text


def bundle_directory(text: str) -> str:
    """An argparse type: a bundle path whose parent directory exists (checked before any long work)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    if not path.parent.exists():
        raise argparse.ArgumentTypeError(f"the directory {path.parent} does not exist: create it first")
    return text


def bench_file(path: str):
    """(model, title, configurations) of a bench file; a malformed one is a user error."""
    from diffopt.evaluation.bench import load_configurations

    try:
        return load_configurations(path)
    except ValueError as error:
        raise UsageError(str(error)) from None


def add_sources(parser: argparse.ArgumentParser, model_help: str | None) -> None:
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
        "--num-calls", type=bounded(int, 1, "--num-calls"), default=4, help="calls made up without --calls"
    )
    parser.add_argument(
        "--steps", type=bounded(int, 2, "--steps"), default=None, help="num_inference_steps of every pipeline call"
    )
