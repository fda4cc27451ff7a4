"""``diffopt info``: what a captured graph holds, and the plugins loaded."""

from __future__ import annotations

import argparse

from diffopt.capture import capture
from diffopt.cli.common import add_sources, batch_one, format_table, load_model, pipeline_calls, run_enabled, source_of
from diffopt.measure.macs import summarize
from diffopt.util.plugins import loaded_plugins


def add_parser(commands) -> None:
    """The ``info`` command and its options."""
    parser = commands.add_parser("info", help="summarise a captured denoiser graph")
    add_sources(parser, "reference model name (dit-digits, unet-digits, dit-digits-flow) or simple-dit")
    parser.add_argument("--layers", action="store_true", help="list every linear layer")
    parser.set_defaults(run=run)


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


def run(args: argparse.Namespace) -> None:
    kind, source = source_of(args)
    if kind == "pipeline":
        program = run_enabled(source, pipeline_calls(args, source)[0])
        captured, example = program.graph, program.example
    else:
        model, inputs = (source.model, source.inputs) if kind == "bare" else load_model(source, False)[:2]
        captured = capture(model, inputs)
        example = batch_one(captured, inputs)
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
