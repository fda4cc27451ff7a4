"""Your own model on the command line: ``diffopt info|tune|bench --pipeline DIR`` on
pipelines saved with ``save_pretrained`` (tiny parts, loaded offline), ``--model
package.module:function``, and ``diffopt.tune`` from Python."""

import json

import pytest
import torch
from test_pipelines import CASES, FLUX_CHAINS, _flux, _sd3, _text

import diffopt
from diffopt.cli import main
from diffopt.measure.search import search_space
from diffopt.passes.registry import load_passes
from diffopt.pipelines.loading import load_pipeline
from diffopt.pipelines.workload import run_call

STEPS = 6
TUNED = {  # a saved tiny pipeline of each family, the arguments of its calls, and the search's candidates
    "DiT": (CASES["DiTPipeline"].build, {"class_labels": [1, 2], "guidance_scale": 1.0}, None),
    "SD UNet": (CASES["StableDiffusionPipeline"].build, {**_text(16), "height": 8, "width": 8}, None),
    "SD3": (_sd3, {**_text(16, pooled=8), "height": 8, "width": 8}, None),
    "Flux": (_flux, {**_text(16, pooled=8), "height": 8, "width": 8}, FLUX_CHAINS),
}


def _save(build, directory):
    pipe = build()
    pipe.save_pretrained(directory)
    return directory


def _bench_file(path, container):
    chain = {"container": list(container)} if container else {}
    configurations = [
        {"name": "block cache p2", "passes": [{"pass": "BlockCachePass", "period": 2}], "steps": STEPS},
        {"name": "first-block 0.02", "passes": [{"pass": "FirstBlockCachePass", "threshold": 0.02, **chain}]},
        {"name": "4 steps", "passes": [], "steps": 4},
        {"name": "identity", "passes": [], "steps": STEPS},
    ]
    for configuration in configurations:
        configuration.setdefault("steps", STEPS)
    path.write_text(json.dumps({"title": "candidates", "configurations": configurations}))
    return path


def _psnr_of(pipe, passes, calls, steps):
    reference = torch.cat([run_call(pipe, call, steps).flatten() for call in calls])
    diffopt.enable(pipe, passes)
    try:
        got = torch.cat([run_call(pipe, call, steps).flatten() for call in calls])
    finally:
        diffopt.disable(pipe)
    mse = float((got - reference).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


@pytest.mark.parametrize("family", TUNED)
def test_tune_pipeline_chooses_passes_that_meet_the_target_on_held_out_calls(family, tmp_path, capsys):
    build, arguments, container = TUNED[family]
    directory = _save(build, tmp_path / "pipe")
    calls = [{**arguments, "seed": seed} for seed in (0, 1)]
    torch.save(calls, tmp_path / "calls.pt")
    stem = tmp_path / "tuned"
    main(
        ["tune", "--pipeline", str(directory), "--calls", str(tmp_path / "calls.pt"), "--steps", str(STEPS)]
        + ["--min-psnr", "30", "--candidates", str(_bench_file(tmp_path / "c.json", container)), "--out", str(stem)]
    )
    assert "chosen for >= 30.0 dB" in capsys.readouterr().out
    summary = json.loads(stem.with_suffix(".json").read_text())
    assert {r["name"] for r in summary["rows"]} >= {"block cache p2", "identity"}
    assert (tmp_path / "tuned.png").stat().st_size > 0 and "| *" in (tmp_path / "tuned.md").read_text()
    passes, extra = load_passes(tmp_path / "tuned.passes.json")
    assert extra["reference_steps"] == STEPS
    held_out = [{**arguments, "seed": seed} for seed in (7, 8)]  # seeds neither the scoring nor tune's check used
    assert _psnr_of(load_pipeline(directory), passes, held_out, extra["steps"]) >= 30.0
    cheaper = [r for r in summary["rows"] if r["mac_fraction"] < summary["chosen"]["mac_fraction"] - 1e-9]
    assert all(r["psnr"] < 30.0 or r["name"] in summary["failed_validation"] for r in cheaper)


def test_python_tune_searches_the_default_space_and_reports_what_it_skipped(tmp_path):
    pipe = CASES["DiTPipeline"].build()
    pipe.set_progress_bar_config(disable=True)
    calls = [{"class_labels": [1, 2], "guidance_scale": 1.0, "num_inference_steps": 4, "seed": 0}]
    run_call(diffopt.enable(pipe), calls[0])
    space = search_space(pipe.transformer.programs[-1].graph.module, 4)
    diffopt.disable(pipe)
    assert {c.family for c in space} == {
        "steps",
        "forecast cache",
        "ICC",
        "plain reuse",
        "block cache",
        "first-block cache",
    }
    one_each = list({c.family: c for c in space}.values())  # the last of each family (the full space: the benchmark)
    # a metric the user cares about: the mean image must not drift by more than 0.01
    summary = diffopt.tune(
        pipe,
        calls,
        25.0,
        candidates=one_each,
        metric=lambda out, ref: -abs(float(out.mean() - ref.mean())),
        min_metric=-0.01,
        out=str(tmp_path / "t"),
        progress=False,
    )
    assert {row["family"] for row in summary["rows"]} == {c.family for c in one_each}
    assert summary["chosen"]["validation_metric"] >= -0.01 and summary["chosen"]["validation_psnr"] >= 25.0
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel"  # left as it came
    with pytest.raises(ValueError, match=r"calls\[0\] needs an integer 'seed'"):
        diffopt.tune(pipe, [{"class_labels": [1]}], 30.0)
    with pytest.raises(ValueError, match="min_psnr must be a finite number"):
        diffopt.tune(pipe, calls, float("nan"))
    with pytest.raises(ValueError, match="diffopt is enabled"):
        diffopt.tune(diffopt.enable(CASES["DiTPipeline"].build()), calls, 30.0)


def test_info_and_bench_on_a_saved_pipeline_and_a_factory(tmp_path, capsys):
    directory = _save(CASES["DiTPipeline"].build, tmp_path / "pipe")
    calls = tmp_path / "calls.json"
    calls.write_text(json.dumps([{"class_labels": [1, 2], "guidance_scale": 1.0, "seed": 0}]))
    main(["info", "--pipeline", str(directory), "--calls", str(calls), "--steps", "2"])
    out = capsys.readouterr().out
    assert "DiTTransformer2DModel" in out and "transformer_blocks: 3" in out
    main(["info", "--model", "models:simple_dit_with_inputs"])
    assert "SimpleDiT" in capsys.readouterr().out
    stem = tmp_path / "bench"
    main(
        ["bench", str(_bench_file(tmp_path / "c.json", None)), "--out", str(stem), "--pipeline", str(directory)]
        + ["--calls", str(calls), "--steps", str(STEPS), "--repeats", "1"]
    )
    rows = {r["name"]: r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    assert rows["identity"]["psnr"] == float("inf") and rows["identity"]["mac_fraction"] == pytest.approx(1.0)
    assert rows["block cache p2"]["mac_fraction"] < 1.0 and rows["4 steps"]["mac_fraction"] == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info"], "name exactly one of"),
        (["info", "dit-digits", "--pipeline", "x"], "name exactly one of"),
        (["info", "--pipeline", "/nonexistent"], "has no model_index.json"),
        (["info", "--model", "nonexistent_pkg:f"], "cannot import 'nonexistent_pkg'"),
        (["info", "--model", "models"], "expected package.module:function"),
        (["tune", "--model", "models:simple_dit_with_inputs", "--min-psnr", "30"], "give a pipeline"),
    ],
)
def test_sources_that_cannot_work_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
