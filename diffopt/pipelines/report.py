"""``summary``: what the caches of an enabled pipeline did, per program, run and stream.

Each eager run of a program records the variant of every step (``runtime.streams``); the
summary counts them and prices each variant (and probe) by the MACs its own graph computes
(``measure.macs``, at batch 1): work saved is ``1 - MACs run / (steps x MACs of the plain
captured graph)``. The plain graph is the yardstick, not the ``full`` variant: a first-block
cache's ``full`` variant starts after the first block, which its probe computed.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from diffopt.measure.macs import macs_per_node, macs_per_run
from diffopt.pipelines.call_key import describe_change


@dataclass(frozen=True)
class StreamRun:
    """One stream of one run: its steps' variants, counted, and the work it saved."""

    program: str  # what tells the program apart from the others (its call signature)
    run: int
    stream: str
    variants: tuple[str, ...]
    work_saved: float  # 1 - MACs run / MACs of the plain graph at every step (NaN for a bundle: no graphs)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(self.variants))


@dataclass(frozen=True)
class Summary:
    model: str
    runs: tuple[StreamRun, ...]

    def __str__(self) -> str:
        lines = [f"diffopt summary of {self.model}: {len(self.runs)} stream run(s)"]
        header = f"{'run':>4}  {'stream':<10} {'steps':>5}  {'work saved':>10}  variants"
        lines.append(header)
        for r in self.runs:
            counts = ", ".join(f"{name} {count}" for name, count in r.counts.items())
            lines.append(f"{r.run:>4}  {r.stream:<10} {len(r.variants):>5}  {r.work_saved:>10.1%}  {counts}")
            lines.append(f"{'':>4}  program: {r.program}; steps: {' '.join(r.variants)}")
        return "\n".join(lines)


def summarize(component) -> Summary:
    """The ``Summary`` of an ``OptimizedComponent``'s recent runs (oldest first)."""
    programs = component.programs
    runs = []
    for index, program in enumerate(programs):
        label = "first call" if index == 0 else describe_change(programs[0].key, program.key)
        if program.key is None:
            label = "exported bundle"
        denoiser = program.denoiser
        priced = program.graph is not None  # an exported bundle has no graphs to count MACs in
        plain = sum(macs_per_node(program.graph.module, program.example).values()) if priced else 0
        for record in denoiser.run_history():
            if not record.variants:
                continue
            saved = math.nan
            if plain:
                spent = macs_per_run(denoiser.program, program.example, variants_run=record.variants)
                saved = 1.0 - spent / (len(record.variants) * plain)
            runs.append(StreamRun(label, record.run, record.stream, tuple(record.variants), saved))
    runs.sort(key=lambda r: r.run)
    return Summary(type(component.original).__name__, tuple(runs))
