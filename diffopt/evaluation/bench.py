"""``diffopt bench``: run a set of configurations on one shipped model, in one run, and
write a table, JSON and a Pareto plot.

A configuration is a pass list (``diffopt.passes.registry`` dicts) on a backend at a
step count, the unmodified model (``passes=None``), or a baseline from another library
(``baseline={"kind": "diffusers-hook" | "cache-dit", ...}``). The first configuration is
the reference the others are measured against. Per configuration:
- quality: ``samples`` class-conditional digits (equal counts per class) from the same
  seeded noise as the reference: digits FD, classifier accuracy, and paired PSNR /
  relative L2 / predicted-label agreement against the reference's samples;
- MACs per sample, counted while the quality run executes (``count_macs``), so adaptive
  methods are charged for the decisions they made;
- wall time of a run of ``timing_batch`` samples: all configurations interleaved, after
  a warm-up round, ``repeats`` rounds, median; speed-up = reference median / median.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffopt.capture import capture
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd, label_agreement
from diffopt.evaluation.runs import generate, scheduler, time_runs
from diffopt.measure.calibration import calibrate
from diffopt.measure.fidelity import psnr, relative_l2
from diffopt.measure.macs import count_macs
from diffopt.measure.search import pareto
from diffopt.models import example_inputs, load
from diffopt.models.zoo import get_spec
from diffopt.optimize import optimize
from diffopt.passes.registry import pass_from_dict
from diffopt.runtime.backends import program_backend
from diffopt.sampling.sequential import Sampler
from diffopt.util.files import read_json, replacing, write_text
from diffopt.util.validation import require_int

BASELINE_KINDS = ("diffusers-hook", "cache-dit")
REFERENCE_STEPS = 50  # the zoo models' reference run


@dataclass(frozen=True)
class Configuration:
    name: str
    passes: tuple[dict, ...] | None = None  # None: the unmodified model; () the captured graph, no passes
    steps: int | None = None  # None: the reference's steps (a pipeline's calls' own, 50 for the zoo models)
    backend: str = "torch"
    baseline: dict | None = None  # another library's method on the model (see BASELINE_KINDS)
    family: str = ""  # groups rows in the plot

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a configuration's name is a non-empty string, found {self.name!r}")
        if self.steps is not None:
            require_int(f"configuration {self.name!r}", "steps", self.steps, minimum=1)
        if self.passes is not None and not (
            isinstance(self.passes, (list, tuple)) and all(isinstance(p, dict) for p in self.passes)
        ):
            raise ValueError(
                f"configuration {self.name!r}: passes is a list of pass objects, found {self.passes!r:.80}"
            )
        if self.baseline is not None and not isinstance(self.baseline, dict):
            raise ValueError(f"configuration {self.name!r}: baseline is an object, found {self.baseline!r:.80}")
        if not isinstance(self.family, str):
            raise ValueError(f"configuration {self.name!r}: family is a string, found {self.family!r:.80}")
        program_backend(self.backend, f"configuration {self.name!r}")
        if self.baseline is not None and (self.passes is not None or self.baseline.get("kind") not in BASELINE_KINDS):
            raise ValueError(
                f"configuration {self.name!r}: a baseline has no passes and a kind in {BASELINE_KINDS}, "
                f"found {self.baseline!r}"
            )
        if self.passes is not None:
            object.__setattr__(self, "passes", tuple(self.passes))
            for item in self.passes:
                pass_from_dict(item)  # an unknown pass or option fails here, naming it

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Configuration:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or "name" not in data or set(data) - known:
            raise ValueError(f"a configuration is an object with a name and fields among {sorted(known)}: {data!r}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passes"] = None if self.passes is None else list(self.passes)
        return data

    @property
    def needs_calibration(self) -> bool:
        return any(pass_from_dict(item).needs_calibration for item in self.passes or ())


def with_reference_steps(configurations: Sequence[Configuration], steps: int) -> list[Configuration]:
    """``configurations`` with ``steps`` where they name none (they run the reference's steps)."""
    return [c if c.steps is not None else dataclasses.replace(c, steps=steps) for c in configurations]


def load_configurations(path: str | os.PathLike) -> tuple[str | None, str, list[Configuration]]:
    """(model name, title, configurations) of a bench file
    ``{"model": ..., "title": ..., "configurations": [...]}``; a file for pipelines
    (``diffopt bench --pipeline``) may name no model (``None``)."""
    data = read_json(path, "a bench file")
    if not isinstance(data, dict) or not isinstance(data.get("configurations"), list):
        raise ValueError(f"{path} is not a bench file: expected an object with a 'configurations' list")
    model = data.get("model")
    if not isinstance(model, (str, type(None))) or not isinstance(data.get("title", ""), str):
        raise ValueError(f"{path}: 'model' and 'title' are strings, found {model!r:.60}, {data.get('title')!r:.60}")
    if model is not None:
        get_spec(model)  # an unknown model is named before any run
    if not data["configurations"]:
        raise ValueError(f"{path}: 'configurations' is empty: the first one is the reference")
    try:
        configurations = [Configuration.from_dict(item) for item in data["configurations"]]
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    names = [c.name for c in configurations]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: configuration names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return model, data.get("title", f"Configurations on {model or 'a pipeline'}"), configurations


def build(configuration: Configuration, model: torch.nn.Module, graph, calibration, config: dict) -> Callable:
    """The denoiser a ``Sampler`` drives for ``configuration`` (``config``: the model's
    scheduler, for baselines that calibrate by sampling)."""
    from diffopt.evaluation.baselines import CacheDitBaseline, DiffusersCacheHook, mag_cache_ratios

    if configuration.baseline is not None:
        options = {k: v for k, v in configuration.baseline.items() if k != "kind"}
        if configuration.baseline["kind"] == "cache-dit":
            return CacheDitBaseline(model, configuration.steps, **options)
        if options.get("taylor_factors_dtype") == "float32":
            options["taylor_factors_dtype"] = torch.float32
        if options["method"] == "mag-cache" and "mag_ratios" not in options:  # calibrated on other noise
            steps = options["num_inference_steps"] = configuration.steps
            options["mag_ratios"] = mag_cache_ratios(model, steps, lambda hook: generate(hook, config, steps, 20, 777))
        return DiffusersCacheHook(model, options.pop("method"), **options)
    if configuration.passes is None:
        return model
    passes = [pass_from_dict(item) for item in configuration.passes]
    return optimize(graph, passes, calibration=calibration, backend=configuration.backend)


def reference_calibration(graph, config: dict):
    """Statistics for the passes that need them: a 50-step run of 20 samples, two seeds."""
    sampler = Sampler(scheduler(config, 50), progress=False)
    return calibrate(optimize(graph).program, sampler, (torch.arange(20) % 10,), (20, 1, 16, 16), seeds=(777, 778))


def measure(
    denoiser: Callable,
    config: dict,
    steps: int,
    samples: int,
    seed: int,
    reference: torch.Tensor | None,
    distribution: bool = True,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Quality and MACs of one run, and its images (``reference=None``: this run is the
    reference). ``distribution=False`` skips digits FD and classifier accuracy."""
    started = time.perf_counter()
    with count_macs() as counter:
        images = generate(denoiser, config, steps, samples, seed=seed)
    reference = images if reference is None else reference
    row = {"macs_per_sample": counter.macs / samples, "psnr": psnr(images, reference)}
    if distribution:
        row |= {
            "rel_l2": relative_l2(images, reference),
            "label_agreement": label_agreement(images, reference),
            "fd": digits_fd(images),
            "accuracy": class_accuracy(images, torch.arange(samples) % 10),
        }
    row["quality_run_s"] = time.perf_counter() - started
    return row, images


def run_bench(
    model_name: str,
    configurations: Sequence[Configuration],
    *,
    samples: int = 600,
    timing_batch: int = 50,
    repeats: int = 3,
    timing_only: bool = False,
    seed: int = 0,
    reference_seeds: int = 1,
) -> dict[str, Any]:
    """Measure every configuration (the first is the reference); returns the summary. With
    ``reference_seeds`` > 1 the reference also samples that many noise seeds in all, for
    its FD's seed noise (mean and standard deviation in ``reference_fd``)."""
    if not configurations:
        raise ValueError("no configurations to run")
    configurations = with_reference_steps(configurations, configurations[0].steps or REFERENCE_STEPS)
    model, config = load(model_name)
    graph = capture(model, example_inputs(model_name))
    calibration = reference_calibration(graph, config) if any(c.needs_calibration for c in configurations) else None
    denoisers = {c.name: build(c, model, graph, calibration, config) for c in configurations}
    rows, reference = [], None
    for configuration in [] if timing_only else configurations:
        row, images = measure(denoisers[configuration.name], config, configuration.steps, samples, seed, reference)
        reference = images if reference is None else reference
        rows.append({**configuration.to_dict(), **row})
        print(json.dumps({k: rows[-1][k] for k in ("name", "macs_per_sample", "psnr", "fd")}), flush=True)
    reference_fd = []
    if not timing_only and reference_seeds > 1:
        first = configurations[0]
        reference_fd = [rows[0]["fd"]] + [
            digits_fd(generate(denoisers[first.name], config, first.steps, samples, seed=seed + 100_000 * k))
            for k in range(1, reference_seeds)
        ]
    times = time_runs({c.name: (denoisers[c.name], c.steps) for c in configurations}, config, timing_batch, repeats)
    rows = rows or [configuration.to_dict() for configuration in configurations]
    base_time = statistics.median(times[configurations[0].name])
    for row in rows:
        if "macs_per_sample" in row:
            row["mac_fraction"] = row["macs_per_sample"] / rows[0]["macs_per_sample"]
        row["wall_s_median"] = statistics.median(times[row["name"]])
        row["wall_s_all"] = times[row["name"]]
        row["speedup"] = base_time / row["wall_s_median"]
    return {
        "model": model_name,
        "reference": configurations[0].name,
        "samples": None if timing_only else samples,
        "timing_batch": timing_batch,
        "repeats": repeats,
        "seed": seed,
        "reference_fd": (
            {"seeds": reference_fd, "mean": statistics.mean(reference_fd), "stdev": statistics.stdev(reference_fd)}
            if len(reference_fd) > 1
            else None
        ),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }


def to_markdown(summary: dict, title: str, command: str) -> str:
    reference = summary["reference"]
    lines = [f"# {title}", "", f"`{command}`"]
    if summary["samples"] is None:
        lines += [
            "",
            f"Wall time only: median of {summary['repeats']} interleaved runs of {summary['timing_batch']} samples "
            f"after a warm-up round, torch {summary['torch']}, {summary['threads']} CPU threads.",
            "",
            f"| configuration | steps | wall s (median) | all runs (s) | speed-up vs {reference} |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['name']} | {r['steps']} | {r['wall_s_median']:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in r['wall_s_all'])} | {r['speedup']:.2f}x |"
            for r in summary["rows"]
        ]
        return "\n".join(lines) + "\n"
    noise, seed_noise = summary.get("reference_fd"), []
    if noise:
        band = noise["mean"] + 2 * noise["stdev"]
        seed_noise = [
            f"Seed noise of the FD: {reference} over {len(noise['seeds'])} noise seeds has FD "
            f"{noise['mean']:.2f} ± {noise['stdev']:.2f} (mean + 2 sd: {band:.2f}).",
            "",
        ]
    lines += [
        "",
        f"{summary['samples']} samples per configuration from the same seeded noise; wall time: median of "
        f"{summary['repeats']} interleaved runs of {summary['timing_batch']} samples, torch {summary['torch']}, "
        f"{summary['threads']} CPU threads. PSNR, label agreement and the MAC and time ratios are against "
        f"{reference}.",
        "",
        *seed_noise,
        f"| configuration | steps | MACs vs {reference} | wall speed-up | digits FD | accuracy | PSNR (dB) "
        "| label agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['steps']} | {r['mac_fraction']:.3f} | {r['speedup']:.2f}x | {r['fd']:.2f} | "
        f"{r['accuracy']:.3f} | {r['psnr']:.1f} | {r['label_agreement']:.3f} |"
        for r in summary["rows"]
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """PSNR and digits FD against MACs per family, with the PSNR Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["name"] != summary["reference"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for family in sorted({r["family"] for r in rows}):
        members = [r for r in rows if r["family"] == family]
        macs = [r["mac_fraction"] for r in members]
        left.scatter(macs, [min(r["psnr"], 60) for r in members], label=family or "other")
        right.scatter(macs, [r["fd"] for r in members], label=family or "other")
    front = pareto(rows)
    left.plot([r["mac_fraction"] for r in front], [min(r["psnr"], 60) for r in front], "k--", lw=0.8, label="Pareto")
    reference = summary["reference"]
    left.set(xlabel=f"MACs / {reference}", ylabel="PSNR (dB, capped at 60)", title="paired fidelity vs compute")
    right.set(xlabel=f"MACs / {reference}", ylabel="digits FD (lower is better)", title="FD vs compute", yscale="log")
    left.legend(fontsize=8)
    figure.suptitle(f"{summary['model']}: {title} ({summary['samples']} samples each)")
    figure.tight_layout()
    with replacing(path) as partial:
        figure.savefig(partial, dpi=110, format="png")
    plt.close(figure)


def write_results(summary: dict, stem: str | os.PathLike, title: str, command: str) -> None:
    """``<stem>.json``, ``<stem>.md`` and (with quality rows) ``<stem>.png``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(f"{stem}.json"), json.dumps({**summary, "command": command, "title": title}, indent=2))
    write_text(Path(f"{stem}.md"), to_markdown(summary, title, command))
    if summary["samples"] is not None:
        plot(summary, Path(f"{stem}.png"), title)
