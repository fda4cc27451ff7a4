"""Caching at every budget: diffopt's caches (target x policy x predictor) against diffusers'
cache hooks and cache-dit, on the same weights and the same noise.

Per model (dit-digits; unet-digits; dit-digits with its weights perturbed by our own seeded
noise, a held-out model nothing was tuned on) every row samples ``--samples`` digits from
one seeded noise with 50 DDIM steps: PSNR against the plain 50-step samples, digits FD, and
MACs counted as the row ran (``measure.macs.count_macs``: hooks and cache-dit included).
The learned predictor is fitted on other seeds (``CALIBRATION_SEED``) than the scored ones.

Rows are measured once each and appended to ``results/caching_pareto/rows.jsonl``
(resumable: a rerun skips the rows it finds), in priority order: dit-digits' main rows
(stage 1), diffopt tune's pick per budget on it (``tune_picks``), the other models' main
rows, then the wider sweeps (stage 2); ``--report`` writes ``summary.json``,
``summary.md`` (best PSNR per library at MACs <= each budget) and ``<model>.png`` there from
the rows measured so far.

    nohup python benchmarks/caching_pareto.py > benchmarks/results/caching_pareto.log 2>&1 &
    python benchmarks/caching_pareto.py --report
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from diffopt import capture, optimize
from diffopt.evaluation.baselines import CacheDitBaseline, DiffusersCacheHook, mag_cache_ratios
from diffopt.evaluation.metrics.digits import digits_fd
from diffopt.evaluation.runs import generate
from diffopt.evaluation.workload import LEARNED_FIT_SAMPLES, LEARNED_FIT_SEED, DigitsWorkload, counted_run
from diffopt.ir.program import StepProgram
from diffopt.measure.fidelity import psnr
from diffopt.measure.predictor_fit import fit_learned
from diffopt.measure.search import choose_within_budget
from diffopt.measure.tuning import Measurements, candidate_list
from diffopt.measure.workload import Configuration
from diffopt.models import example_inputs, load
from diffopt.passes.cache import CachePass
from diffopt.passes.caching.policies import ErrorGated, Periodic, TaylorSeerPlan
from diffopt.passes.caching.predictors import Learned
from diffopt.passes.caching.targets import AfterFirst, Blocks, Span
from diffopt.passes.registry import load_passes, pass_from_dict, pass_to_dict, save_passes

STEPS = 50
SEED = 0  # the scored noise, the same for every library
CALIBRATION_SEED = 900_000  # the learned predictor's fit
TUNE_SEED = 300_000  # tune scores its candidates on this noise (validation: its own held-out seed)
TUNE_SAMPLES = 64  # tune's samples per candidate (its plan search: fewer, see evaluation.tune)
PERTURBATION_SEED = 20261207
PERTURBATION = 0.05  # each weight += 0.05 x its tensor's std x N(0, 1)
BUDGETS = (0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.50)
MODELS = ("dit-digits", "dit-digits-perturbed", "unet-digits")
CADENCES = (3, 4, 5, 6, 7, 8, 10)  # the hook's cache intervals i
LONG_WARMUPS = ((8, 3), (10, 3))  # (D, i): full steps for 0.45-0.50 of the MACs, for diffopt and the hook alike
RESULTS = Path(__file__).parent / "results" / "caching_pareto"
ROWS = "rows.jsonl"


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A held-out copy of ``model``: each weight moved by seeded noise scaled to its tensor."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(PERTURBATION_SEED)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(PERTURBATION * float(parameter.std() if parameter.numel() > 1 else 0.0) * noise)
    return model


def model_for(name: str) -> tuple[torch.nn.Module, dict, str]:
    base = name.removesuffix("-perturbed")
    model, config = load(base)
    return (perturbed(model) if name.endswith("-perturbed") else model), config, base


def diffopt_rows(name: str, graph, config) -> Iterator[tuple[int, str, dict, Callable]]:
    """(stage, row name, settings, builder) of diffopt's caches on ``name``."""
    unet = name.startswith("unet")
    targets = (
        {"up_blocks.1": Blocks(blocks=("up_blocks.1",)), "up_blocks.2": Blocks(blocks=("up_blocks.2",))}
        if unet
        else {"span output": Span(value="output"), "span residual": Span(value="residual")}
    )
    plans = {
        f"TaylorSeer plan D{d} i{i}": TaylorSeerPlan(period=i, warmup=d) for d in (2, 3) for i in (3, 4, 5, 6, 8, 10)
    }
    periodic = {f"periodic p{p} w3": Periodic(period=p, warmup=3) for p in (4, 6)}
    predictors = {"newton o1": {"kind": "newton", "order": 1}, "taylorseer o2": {"kind": "taylorseer", "order": 2}}
    for target_name, target in targets.items():
        for policy_name, policy in {**plans, **periodic}.items():
            for predictor_name, predictor in predictors.items():
                yield _cache_row(graph, target_name, target, policy_name, policy, predictor_name, predictor)
        for policy_name, policy in periodic.items():
            yield (
                1,
                f"{target_name}, {policy_name}, learned h2",
                {"fitted on": f"16 samples, seed {CALIBRATION_SEED}"},
                (lambda target=target, policy=policy: optimize(graph, [learned_cache(graph, config, target, policy)])),
            )
    if not unet:  # error-gated forecasting of the blocks after the first (the first block is the gate)
        for threshold in (0.05, 0.1, 0.2, 0.3):
            policy = ErrorGated(threshold=threshold)
            for predictor_name, predictor in predictors.items():
                name = f"error-gated {threshold}"
                yield _cache_row(
                    graph, "after first output", AfterFirst(value="output"), name, policy, predictor_name, predictor
                )
    for target_name, target in targets.items():  # plans filling 0.45-0.50 of the MACs (the hook gets them too)
        for d, i in LONG_WARMUPS:
            for predictor_name, predictor in predictors.items():
                plan, name = TaylorSeerPlan(period=i, warmup=d), f"TaylorSeer plan D{d} i{i}"
                yield _cache_row(graph, target_name, target, name, plan, predictor_name, predictor)
    # the rest of the peers' plan grid (D in {1, 5}, i = 7), on the target the hook forecasts (UNet: stage 2)
    target_name, target = next(iter(targets.items()))
    for d, i in [(d, i) for d in (1, 5) for i in (3, 4, 5, 6, 7, 8, 10)] + [(2, 7), (3, 7)]:
        for predictor_name, predictor in predictors.items():
            plan = TaylorSeerPlan(period=i, warmup=d)
            name = f"TaylorSeer plan D{d} i{i}"
            yield _cache_row(graph, target_name, target, name, plan, predictor_name, predictor, 2 if unet else 1)


def _cache_row(graph, target_name, target, policy_name, policy, predictor_name, predictor, stage=1):
    cache = CachePass(target=target, policy=policy, predictor=predictor)
    return (
        stage,
        f"{target_name}, {policy_name}, {predictor_name}",
        {"passes": [pass_to_dict(cache)]},
        (lambda: optimize(graph, [cache])),
    )


def learned_cache(graph, config, target, policy) -> CachePass:
    predictor = fit_learned(
        StepProgram.from_captured(graph),
        target,
        policy,
        STEPS,
        2,
        lambda denoiser: generate(denoiser, config, STEPS, 16, seed=CALIBRATION_SEED),
    )
    return CachePass(target=target, policy=policy, predictor=predictor)


def peer_rows(name: str, model, config) -> Iterator[tuple[int, str, dict, Callable]]:
    """(stage, row name, settings, builder) of diffusers' TaylorSeer (its plan sweep, block
    targets first, module targets in stage 2), FirstBlockCache and MagCache hooks, and
    cache-dit's DBCache with its TaylorSeer and FoCa calibrators (DiTs: cache-dit has no UNet
    support)."""
    unet = name.startswith("unet")
    # a UNet's up block cached by the hook still computes all that feeds it (hooks skip no upstream work); caching
    # the mid and all up blocks is the hook's cheapest UNet plan (its down blocks return tuples the hook refuses)
    identifiers = (
        {
            "up_blocks.2": (1, r"up_blocks\.2"),
            "mid+up_blocks": (1, r"(mid_block|up_blocks\.\d+)"),
            "up_blocks.1": (2, r"up_blocks\.1"),
        }
        if unet
        else {"blocks": (1, r"transformer_blocks\.\d+"), "modules": (2, r"transformer_blocks\.\d+\.(attn1|ff)")}
    )
    for target, (stage, pattern) in identifiers.items():
        narrow = target == "mid+up_blocks"  # the grid only: D in {1, 3, 5}, i in 3..8
        grid = [(d, i) for d in ((1, 3, 5) if narrow else (1, 2, 3, 5)) for i in (range(3, 9) if narrow else CADENCES)]
        for d, i in grid + (list(LONG_WARMUPS) if stage == 1 else []):  # D = 2: diffopt's; long warm-ups: both
            for order in (1, 2):
                options = {
                    "cache_interval": i,
                    "disable_cache_before_step": d,
                    "max_order": order,
                    "taylor_factors_dtype": torch.float32,
                    "cache_identifiers": [pattern],
                }
                yield (
                    stage,
                    f"diffusers TaylorSeer {target} D{d} i{i} o{order}",
                    ({"library": "diffusers", **{k: str(v) for k, v in options.items()}}),
                    lambda options=options: DiffusersCacheHook(model, "taylorseer", **options),
                )
    if unet:
        return
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.5):
        yield (
            1,
            f"diffusers FirstBlockCache {threshold}",
            {"library": "diffusers", "threshold": threshold},
            (lambda threshold=threshold: DiffusersCacheHook(model, "first-block-cache", threshold=threshold)),
        )
    ratios: list[float] = []

    def mag_cache(threshold):
        ratios[:] = ratios or mag_cache_ratios(model, STEPS, lambda hook: generate(hook, config, STEPS, 20, 777))
        return DiffusersCacheHook(model, "mag-cache", threshold=threshold, mag_ratios=ratios, num_inference_steps=STEPS)

    for threshold in (0.06, 0.12, 0.24, 0.5):
        yield (
            1,
            f"diffusers MagCache {threshold}",
            {"library": "diffusers", "threshold": threshold},
            (lambda threshold=threshold: mag_cache(threshold)),
        )
    for stage, threshold in ((1, 0.12), (1, 0.3), (2, 0.2), (2, 0.5)):
        for calibrator, order in (("taylorseer", 1), ("taylorseer", 2), ("foca", None)):
            options = {"Fn_compute_blocks": 1, "residual_diff_threshold": threshold, "max_warmup_steps": 4}
            label = f"{calibrator} o{order}" if order else calibrator
            yield (
                stage,
                f"cache-dit DBCache {threshold} w4 {label}",
                ({"library": "cache-dit", **options, "calibrator": label}),
                lambda options=options, calibrator=calibrator, order=order: CacheDitBaseline(
                    model, STEPS, taylorseer_order=order, calibrator=calibrator, **options
                ),
            )


def run(out: Path, samples: int, models: tuple[str, ...], stages: tuple[int, ...] = (1, 2)) -> None:
    """Measure every row of ``stages`` not yet in ``out/rows.jsonl``: stage 1 of dit-digits,
    tune's picks on it, stage 1 of the other models, then stage 2 of all."""
    if 1 in stages:
        for name in ("dit-digits", "unet-digits"):
            if name in models:
                run_stage(out, samples, (name,), 1)
                if not (out / f"{name}_{BUDGETS[-1]}.passes.json").exists():
                    tune_picks(out, samples, name)
        run_stage(out, samples, models, 1)
    if 2 in stages:
        run_stage(out, samples, models, 2)


def measured(denoiser, config, steps: int, samples: int, reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """A row (PSNR against ``reference``, or none for the reference itself; MACs per sample)
    and the images of ``samples`` digits of the scored noise."""
    images, macs = counted_run(denoiser, config, steps, samples, SEED)
    return {"macs_per_sample": macs / samples, "psnr": psnr(images, images if reference is None else reference)}, images


def run_stage(out: Path, samples: int, models: tuple[str, ...], stage: int) -> None:
    """Measure the rows of ``stage`` of ``models`` not yet in ``out/rows.jsonl``."""
    done = {(r["model"], r["name"]) for r in _rows(out)}
    for name in models:
        model, config, base = model_for(name)
        graph = capture(model, example_inputs(base))
        rows = [(1, "plain 50 steps", {"library": "plain"}, lambda model=model: model)]
        rows += [*peer_rows(name, model, config), *diffopt_rows(name, graph, config)]
        if name == "dit-digits-perturbed":
            rows += transferred_picks(graph)
        todo = [row for row in rows if row[0] == stage and (name, row[1]) not in done]
        if not todo:
            continue
        _, reference = measured(model, config, STEPS, samples, None)
        for _, row_name, settings, build in todo:
            started = time.perf_counter()
            steps = settings.get("steps", STEPS)
            row, images = measured(build(), config, steps, samples, reference)
            record = {
                "model": name,
                "name": row_name,
                "library": settings.get("library", "diffopt"),
                "settings": settings,
                "samples": samples,
                "fd": digits_fd(images),
                **row,
                "seconds": time.perf_counter() - started,
            }
            _append(out, record)
            print(f"{name:22} {row_name:60} {row['psnr']:6.2f} dB  {row['macs_per_sample']:.4g} MACs", flush=True)


def tune_picks(out: Path, samples: int, name: str, budgets: tuple[float, ...] = BUDGETS) -> None:
    """diffopt tune's pick for each budget on ``name``: every candidate of the default search
    space scored once on ``TUNE_SAMPLES`` samples of ``TUNE_SEED`` noise (not the benchmark's), the best
    ``MAX_VALIDATIONS`` under each budget checked on held-out noise (tune's), the choice's plan
    refined (``measure.tuning.Measurements.refine_choice``), the pick written as ``<name>_<budget>.passes.json``
    and measured like every other row. Replaces the rows of an earlier tune of ``name`` at ``budgets``."""
    redone = tuple(f"tune pick <= {budget}:" for budget in budgets)
    kept = [r for r in _rows(out) if not (r["model"] == name and r["name"].startswith(redone))]
    _write_rows(out, kept)
    model, config = load(name)
    workload = DigitsWorkload(name, samples=TUNE_SAMPLES, validation_samples=200, seed=TUNE_SEED)
    scored = Measurements(workload)
    scored.score(candidate_list(workload, None), progress=True)
    _, reference = measured(model, config, STEPS, samples, None)
    grid = list(scored.rows)  # each budget refines a choice of the search space, not another budget's plan
    for budget in budgets:
        chosen, tried = choose_within_budget(grid, budget, "macs", scored.validate, name)
        chosen = scored.refine_choice(chosen)
        save_passes(
            out / f"{name}_{budget}.passes.json",
            [pass_from_dict(item) for item in chosen["passes"]],
            steps=chosen["steps"],
            reference_steps=STEPS,
            model=name,
            budget=budget,
            scored_psnr=chosen["psnr"],
            validation_psnr=chosen["validation_psnr"],
            mac_fraction=chosen["mac_fraction"],
            plans_tried=chosen.get("plans_tried"),
            predictor_fitted_on=_fitted_on(chosen),
            command=f"python benchmarks/caching_pareto.py --tune-picks {name}",
        )
        row, images = measured(
            workload.denoiser(Configuration.of_row(chosen)), config, chosen["steps"], samples, reference
        )
        record = {"model": name, "name": f"tune pick <= {budget}: {chosen['name']}", "library": "diffopt tune"}
        record["settings"] = {"tried": tried, "passes": chosen["passes"], "steps": chosen["steps"]}
        _append(out, {**record, "samples": samples, "fd": digits_fd(images), **row})
        print(f"{name:22} {record['name'][:60]:60} {row['psnr']:6.2f} dB", flush=True)


def _fitted_on(chosen: dict) -> str | None:
    """Where the choice's learned predictor's weights (in the pass file) were fitted, if it has one."""
    predictor = pass_from_dict(chosen["passes"][0]).predictor if chosen["passes"] else None
    if not isinstance(predictor, Learned):
        return None
    return f"{LEARNED_FIT_SAMPLES} samples of seed {LEARNED_FIT_SEED}'s noise (the digits workload's fit inputs)"


def transferred_picks(graph) -> Iterator[tuple[int, str, dict, Callable]]:
    """dit-digits' tune picks (their pass files) applied as they are to other weights: how a
    plan searched on one model holds on a held-out one."""
    for budget in BUDGETS:
        path = RESULTS / f"dit-digits_{budget}.passes.json"
        if not path.exists():
            continue
        passes, fields = load_passes(path)
        settings = {"pass file": path.name, "steps": fields["steps"], "passes": [pass_to_dict(p) for p in passes]}
        yield (
            1,
            f"dit-digits' tune pick <= {budget}, applied",
            settings,
            lambda passes=passes: optimize(graph, passes),
        )


def _rows(out: Path) -> list[dict]:
    path = out / ROWS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(out: Path, rows: list[dict]) -> None:
    """Replace ``out/rows.jsonl`` with ``rows`` (written aside, then moved over it)."""
    staged = out / (ROWS + ".new")
    staged.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows), encoding="utf-8")
    os.replace(staged, out / ROWS)


def _append(out: Path, record: dict) -> None:
    with open(out / ROWS, "a", encoding="utf-8") as file:
        file.write(json.dumps(record, default=str) + "\n")
        file.flush()
        os.fsync(file.fileno())


def report(out: Path) -> None:
    """``summary.json`` and ``summary.md`` in ``out``: per model and budget, each library's
    best PSNR at MACs <= budget (fractions of the plain row's MACs), and the plots."""
    rows = _rows(out)
    summary = {"command": "python benchmarks/caching_pareto.py", "steps": STEPS, "budgets": BUDGETS, "models": {}}
    lines = [
        "# Caching at every budget: diffopt vs diffusers' hooks vs cache-dit",
        "",
        f"`python benchmarks/caching_pareto.py` then `--report`. {STEPS} DDIM steps; every row samples the same "
        "seeded noise with the same weights; PSNR against the plain 50-step samples; MACs counted as each row ran, "
        "as a fraction of the plain row's. Best PSNR (dB) at MACs <= budget; `-`: no row of that library fits. "
        "diffopt's best is over all its rows, tune's picks included.",
        "",
    ]
    for model in MODELS:
        members = [r for r in rows if r["model"] == model]
        plain = next((r for r in members if r["name"] == "plain 50 steps"), None)
        if plain is None:
            continue
        for r in members:
            r["mac_fraction"] = r["macs_per_sample"] / plain["macs_per_sample"]
        libraries = sorted({r["library"] for r in members} - {"plain"})
        table = {}
        lines += [f"## {model} ({len(members) - 1} rows, {plain['samples']} samples each)", ""]
        lines += [
            "| budget | " + " | ".join(libraries) + " | diffopt - best peer | tune - diffopt's best |",
            "|---" * (len(libraries) + 3) + "|",
        ]
        for budget in BUDGETS:
            best = {}
            for library in libraries:
                fits = [r for r in members if r["library"] == library and r["mac_fraction"] <= budget + 1e-9]
                best[library] = max(fits, key=lambda r: r["psnr"]) if fits else None
            peers = [b["psnr"] for lib, b in best.items() if not lib.startswith("diffopt") and b is not None]
            tuned = best.get("diffopt tune")
            ours = max(
                (b for lib, b in best.items() if lib.startswith("diffopt") and b), key=lambda b: b["psnr"], default=None
            )
            lead = f"{ours['psnr'] - max(peers):+.2f}" if ours and peers else "-"
            gap = f"{tuned['psnr'] - ours['psnr']:+.2f}" if ours and tuned else "-"
            cells = [f"{b['psnr']:.2f} ({b['name']}, {b['mac_fraction']:.3f})" if b else "-" for b in best.values()]
            lines.append(f"| {budget:.2f} | " + " | ".join(cells) + f" | {lead} | {gap} |")
            table[str(budget)] = {
                lib: (b and {k: b.get(k) for k in ("name", "psnr", "mac_fraction", "fd")}) for lib, b in best.items()
            }
        lines.append("")
        summary["models"][model] = {"plain_fd": plain["fd"], "best_at_budget": table, "rows": members}
        _plot(model, members, out / f"{model}.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _plot(model: str, members: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for library in sorted({r["library"] for r in members} - {"plain"}):
        points = [r for r in members if r["library"] == library and math.isfinite(r["psnr"])]
        axes.scatter([r["mac_fraction"] for r in points], [r["psnr"] for r in points], s=10, label=library)
    axes.set(xlabel="MACs / plain 50-step run", ylabel="PSNR vs plain (dB)", xlim=(0, 1.05), title=model)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="--tune-picks: these only")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when two runs share the CPU)")
    parser.add_argument("--report", action="store_true", help="only write the tables and plots from the rows there are")
    parser.add_argument(
        "--tune-picks", choices=("dit-digits", "unet-digits"), help="only (re)make diffopt tune's pick per budget"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune_picks:
        tune_picks(out, args.samples, args.tune_picks, tuple(args.budgets))
    elif not args.report:
        run(out, args.samples, tuple(args.models), tuple(args.stages))
    report(out)


if __name__ == "__main__":
    main()
