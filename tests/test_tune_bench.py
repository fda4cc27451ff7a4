"""Pass files, ``diffopt bench`` and ``diffopt tune`` (on the shipped dit-digits, few samples)."""

import json
import re

import pytest
import torch

from diffopt import Sampler, make_scheduler, optimize
from diffopt.cli import main
from diffopt.evaluation.bench import load_configurations, run_bench, write_results
from diffopt.evaluation.workload import DigitsWorkload
from diffopt.measure.search import pareto, save
from diffopt.measure.tuning import tune
from diffopt.measure.workload import Configuration
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.passes.length_shortcut import LengthShortcutPass
from diffopt.passes.registry import load_passes, pass_from_dict, pass_to_dict, save_passes
from diffopt.passes.static_quantization import StaticQuantizationPass
from diffopt.passes.temporal_difference import TemporalDifferencePass

PASSES = [
    BlockCachePass(blocks=("transformer_blocks.1", "transformer_blocks.2"), period=3),
    FirstBlockCachePass(0.2, container="transformer_blocks"),
    ForecastCachePass(order=2, period=4, warmup=3, modules=(r"blocks\.\d+\.fc2",), container=("blocks", "more")),
    IncrementCalibratedCachePass(rank=8, period=3, factorization="channel-aware", mac_budget=0.3),
    LengthShortcutPass(group_size=2, depths=(2, 4), schedule=(2, 4, 4)),
    StaticQuantizationPass(activation_bits=8, weight_bits=None),
    TemporalDifferencePass("difference", bits=4, row_threshold=0.1, refresh_period=5),
]


@pytest.mark.parametrize("graph_pass", PASSES, ids=lambda p: type(p).__name__)
def test_passes_survive_a_json_round_trip(graph_pass):
    data = json.loads(json.dumps(pass_to_dict(graph_pass)))
    assert pass_from_dict(data) == graph_pass
    assert pass_to_dict(type(graph_pass)()) == {"pass": type(graph_pass).__name__}  # defaults are not written


def test_pass_files_and_their_errors(tmp_path):
    path = save_passes(tmp_path / "chosen.json", PASSES[:3], steps=35)
    passes, extra = load_passes(path)
    assert passes == PASSES[:3] and extra == {"steps": 35}
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match=r"FirstBlockCachePass.container must name a chain of blocks"):
        pass_from_dict({"pass": "FirstBlockCachePass", "container": []})
    with pytest.raises(ValueError, match="unknown pass 'Nope'"):
        pass_from_dict({"pass": "Nope"})
    with pytest.raises(ValueError, match=r"ForecastCachePass has no options \['speed'\]"):
        pass_from_dict({"pass": "ForecastCachePass", "speed": 2})
    with pytest.raises(ValueError, match="length_embedding is a Tensor"):
        pass_to_dict(LengthShortcutPass(group_size=2, length_embedding=torch.zeros(3, 4)))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a pass file"):
        load_passes(tmp_path / "bad.json")


def test_configurations_are_checked_when_read(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        Configuration("x", (), backend="tensorrt")
    with pytest.raises(ValueError, match="unknown pass 'NoSuchCachePass'"):
        Configuration("x", ({"pass": "NoSuchCachePass"},))
    with pytest.raises(ValueError, match="a baseline has no passes"):
        Configuration("x", (), baseline={"kind": "cache-dit"})
    with pytest.raises(ValueError, match=r"bundle.runtime must be one of \['onnxruntime', 'openvino'\]"):
        Configuration("x", (), bundle={"runtime": "tensorrt"})
    with pytest.raises(ValueError, match="bundle.precision must be one of"):
        Configuration("x", (), bundle={"precision": "int4"})
    with pytest.raises(ValueError, match="bundle exports a program: give passes"):
        Configuration("x", bundle={})
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"model": "dit-digits", "configurations": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(ValueError, match=r"names repeat: \['a'\]"):
        load_configurations(path)


def test_pareto_keeps_the_rows_nothing_beats_cheapest_first():
    rows = [
        {"name": "a", "mac_fraction": 0.5, "psnr": 40.0},
        {"name": "b", "mac_fraction": 0.3, "psnr": 42.0},
        {"name": "c", "mac_fraction": 0.2, "psnr": 30.0},
        {"name": "d", "mac_fraction": 0.6, "psnr": 45.0},
        {"name": "e", "mac_fraction": 0.3, "psnr": 41.0},
    ]
    assert [r["name"] for r in pareto(rows)] == ["c", "b", "d"]


def test_bench_measures_every_configuration_against_the_first(tmp_path):
    configurations = [
        Configuration("DDIM 50"),
        Configuration("captured graph", ()),
        Configuration("forecast", ({"pass": "ForecastCachePass", "period": 4, "warmup": 5},), family="forecast"),
        Configuration("DDIM 10", (), steps=10),
    ]
    summary = run_bench("dit-digits", configurations, samples=20, timing_batch=2, repeats=1, reference_seeds=2)
    assert len(summary["reference_fd"]["seeds"]) == 2 and summary["reference_fd"]["stdev"] > 0
    rows = {row["name"]: row for row in summary["rows"]}
    assert rows["captured graph"]["psnr"] > 80 and rows["captured graph"]["mac_fraction"] == pytest.approx(1.0)
    assert 0.3 < rows["forecast"]["mac_fraction"] < 0.35 and rows["forecast"]["psnr"] > 40
    assert rows["DDIM 10"]["mac_fraction"] == pytest.approx(0.2) and rows["DDIM 10"]["psnr"] < rows["forecast"]["psnr"]
    assert all(row["speedup"] > 0 and len(row["wall_s_all"]) == 1 for row in rows.values())
    write_results(summary, tmp_path / "out", "test", "pytest")
    table = (tmp_path / "out.md").read_text()
    assert "| forecast | 50 | 0.328 |" in table and "Seed noise of the FD: DDIM 50 over 2 noise seeds" in table
    assert (tmp_path / "out.png").stat().st_size > 0
    assert json.loads((tmp_path / "out.json").read_text())["command"] == "pytest"


def test_a_bench_row_can_be_a_bundle_in_any_precision_on_either_runtime():
    forecast = ({"pass": "ForecastCachePass", "period": 4, "warmup": 3},)
    bundles = {
        "onnxruntime fp32": {"runtime": "onnxruntime"},
        "onnxruntime int8-dynamic": {"runtime": "onnxruntime", "precision": "int8-dynamic"},
        "OpenVINO int8-static": {"runtime": "openvino", "precision": "int8-static"},
    }
    configurations = [Configuration("DDIM 10", steps=10), Configuration("forecast, torch", forecast, steps=10)]
    configurations += [Configuration(f"forecast, {n}", forecast, steps=10, bundle=b) for n, b in bundles.items()]
    summary = run_bench("dit-digits", configurations, samples=10, timing_batch=2, repeats=1)
    rows = {row["name"]: row for row in summary["rows"]}
    torch_row = rows["forecast, torch"]
    for name in bundles:  # a bundle is charged its program's MACs; fp32 runs the same arithmetic, int8 close to it
        row = rows[f"forecast, {name}"]
        assert row["mac_fraction"] == pytest.approx(torch_row["mac_fraction"]) and row["mac_fraction"] < 0.7
        assert row["psnr"] > (torch_row["psnr"] - 0.5 if name.endswith("fp32") else 25), name
    assert rows["forecast, onnxruntime fp32"]["bundle"] == {"runtime": "onnxruntime"}


def test_tune_picks_the_cheapest_validated_configuration_and_saves_its_passes(tmp_path):
    candidates = [
        Configuration("DDIM 10", (), steps=10),  # cheapest, under the floor
        Configuration("reuse p2", ({"pass": "IncrementCalibratedCachePass", "rank": 0},)),  # over it, dearer
        Configuration("forecast", ({"pass": "ForecastCachePass", "period": 4, "warmup": 5},)),
    ]
    summary = tune(
        DigitsWorkload("dit-digits", samples=10, validation_samples=10), 40.0, candidates=candidates, progress=False
    )
    chosen = summary["chosen"]
    assert chosen["name"] == "forecast" and chosen["psnr"] >= 40 and chosen["validation_psnr"] >= 40
    assert {r["name"]: r["psnr"] >= 40 for r in summary["rows"]} == {
        "DDIM 10": False,
        "reuse p2": True,
        "forecast": True,
    }
    path = save(summary, tmp_path / "tune")
    passes, extra = load_passes(path)
    assert passes == [ForecastCachePass(period=4, warmup=5)] and extra["steps"] == 50
    assert (tmp_path / "tune.png").exists()
    with pytest.raises(ValueError, match="no candidate reaches 99.0 dB"):
        tune(
            DigitsWorkload("dit-digits", samples=10, validation_samples=10),
            99.0,
            candidates=candidates[:1],
            progress=False,
        )


def test_a_saved_pass_file_reproduces_the_tuned_program(tmp_path):
    """Deployment applies exactly what was saved: same passes, same samples."""
    from diffopt import capture
    from diffopt.models import example_inputs, load

    model, config = load("dit-digits")
    graph = capture(model, example_inputs("dit-digits"))
    chosen = [ForecastCachePass(order=2, period=5, warmup=4)]
    passes, _ = load_passes(save_passes(tmp_path / "p.json", chosen, steps=20))
    sampler = Sampler(make_scheduler(config, "ddim", 20), progress=False)
    labels = torch.arange(4)
    before = sampler.sample(optimize(graph, chosen), (labels,), shape=(4, 1, 16, 16), seed=3)
    after = sampler.sample(optimize(graph, passes), (labels,), shape=(4, 1, 16, 16), seed=3)
    assert torch.equal(before, after)


def test_cli_bench_refuses_unknown_names_before_running(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"model": "dit-digits", "configurations": [{"name": "DDIM 50"}]}))
    with pytest.raises(SystemExit) as raised:
        main(["bench", str(path), "--out", str(tmp_path / "r"), "--only", "DDIM 51"])
    assert raised.value.code == 2
    assert re.search(r"--only names no configuration .* \['DDIM 51'\]", capsys.readouterr().err)
    (tmp_path / "broken.json").write_text(json.dumps({"model": "dit-digits"}))
    with pytest.raises(SystemExit) as raised:
        main(["bench", str(tmp_path / "broken.json"), "--out", str(tmp_path / "r")])
    assert raised.value.code == 2 and "not a bench file" in capsys.readouterr().err


def _tiny_run(model, steps):
    sampler = Sampler(make_scheduler({"kind": "ddpm"}, "ddim", steps), progress=False)
    return lambda denoiser: sampler.sample(denoiser, (torch.tensor([1, 2]),), shape=(2, 1, 8, 8), seed=5)


def test_mag_cache_ratios_come_from_a_calibration_run():
    from models import diffusers_dit

    from diffopt.evaluation.baselines import DiffusersCacheHook, mag_cache_ratios

    model = diffusers_dit(seed=3)
    ratios = mag_cache_ratios(model, 6, _tiny_run(model, 6))
    assert len(ratios) == 6 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    hooked = DiffusersCacheHook(model, "mag-cache", mag_ratios=ratios, num_inference_steps=6, threshold=0.5)
    run = _tiny_run(model, 6)
    assert torch.equal(run(hooked), run(hooked))  # a second run starts from fresh hook state


def test_cache_dit_refreshes_its_context_for_every_run():
    """cache-dit counts steps in its context: without a refresh a second run's schedule shifts."""
    pytest.importorskip("cache_dit")
    from models import diffusers_dit

    from diffopt.evaluation.baselines import CacheDitBaseline

    model = diffusers_dit(seed=3, num_layers=3)
    baseline = CacheDitBaseline(model, 8, Fn_compute_blocks=1, residual_diff_threshold=0.5, max_warmup_steps=2)
    run = _tiny_run(model, 8)
    first, second = run(baseline), run(baseline)
    assert torch.equal(first, second)
    plain = run(lambda x, t, y: model(x, t, y, return_dict=False)[0])
    assert not torch.allclose(first, plain, atol=1e-6)  # it did cache some steps
