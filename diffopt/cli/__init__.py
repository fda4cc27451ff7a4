"""The ``diffopt`` command line: one module per command (``info``, ``demo``, ``export``,
``sample``, ``calibrate``, ``report``, ``bench``, ``tune``, ``serve``), each with
``add_parser(commands)`` and ``run(args)``, collected in ``COMMANDS``; ``main`` only
dispatches. Every command takes ``--plugin MODULE`` (``util.plugins``: plugins that register
passes, backends and bundle runtimes). Logging is shown on the command line (INFO when
stderr is a terminal, warnings otherwise); the library itself stays quiet."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from diffopt.capture import CaptureError
from diffopt.cli import bench, calibrate, demo, export, info, report, sample, serve, tune
from diffopt.export.onnx import ExportError
from diffopt.models.zoo import UnknownModelError
from diffopt.passes.base import PassError
from diffopt.util.plugins import load_installed_plugins, load_plugin

COMMANDS = (info, demo, export, sample, calibrate, report, bench, tune, serve)

# what a command may raise for a user's input: every library error (bundle, capture, export, input, pass and
# state errors, unknown models, bad values) and unreadable files; each becomes exit 2 with one line
USER_ERRORS = (ValueError, CaptureError, ExportError, PassError, UnknownModelError, OSError)


def build_parser() -> argparse.ArgumentParser:
    """The ``diffopt`` parser: every command with its options (``scripts/cli_docs.py`` writes
    ``docs/cli.md`` from it)."""
    parser = argparse.ArgumentParser(prog="diffopt", description="graph compiler for diffusion denoisers")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
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
    logging.basicConfig(level=logging.INFO if sys.stderr.isatty() else logging.WARNING, format="%(message)s")
    try:
        load_installed_plugins()
        for module in args.plugin:
            load_plugin(module)
        args.run(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        parser.exit(2, f"diffopt {args.command}: error: {message}\n")
