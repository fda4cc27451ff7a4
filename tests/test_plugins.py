"""Plugins across processes: a pass, a program backend and a bundle runtime, each one file in
a package outside the repository, reach ``diffopt bench``, ``export``, ``sample`` and
``info`` in a fresh process through ``--plugin``, ``DIFFOPT_PLUGINS`` and an installed entry
point, with no library edit; a bench result records them so that its recorded command
re-runs; a pass file may name a pass as ``package.module:Class``."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import simple_dit

from diffopt import capture, optimize
from diffopt.export import to_onnx
from diffopt.passes.registry import load_passes, pass_to_dict
from diffopt.runtime.runtimes import load_bundle
from diffopt.sampling.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler
from diffopt.util.plugins import load_plugin

PLUGIN_SOURCES = Path(__file__).parent / "data" / "toyplug"
ENTRY_POINTS = """[diffopt.passes]
plugin-cache = toyplug.toy_pass:PluginOutputCachePass

[diffopt.backends]
toy-counting = toyplug.toy_backend:CountingBackend

[diffopt.runtimes]
onnx-reference = toyplug.toy_runtime:ReferenceRuntime
"""


def _package(root: Path, installed: bool) -> Path:
    """``toyplug`` (the pass and the backend) under ``root``; ``installed``: with the
    dist-info that declares its entry points, as pip would leave it."""
    package = root / "toyplug"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for source in PLUGIN_SOURCES.glob("*.py"):
        shutil.copy(source, package / source.name)
    if installed:
        info = root / "toyplug-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def _diffopt(arguments: list[str], cwd: Path, path: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "DIFFOPT_PLUGINS"}
    env.update(PYTHONPATH=str(path), OMP_WAIT_POLICY="PASSIVE", **environment)
    command = [sys.executable, "-m", "diffopt.cli", *arguments]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_plugin_pass_and_backend_run_bench_from_the_command_line_and_its_recorded_command_reruns(tmp_path):
    path = _package(tmp_path / "plugins", installed=False)
    configurations = [
        {"name": "plain 4 steps", "steps": 4},
        {"name": "plugin cache", "passes": [{"pass": "PluginOutputCachePass"}], "steps": 4, "backend": "toy-counting"},
    ]
    (tmp_path / "bench.json").write_text(json.dumps({"model": "dit-digits", "configurations": configurations}))
    log = tmp_path / "variants.log"
    options = ["--samples", "10", "--timing-batch", "1", "--repeats", "1", "--reference-seeds", "1"]
    plugins = ["--plugin", "toyplug.toy_pass", "--plugin", "toyplug.toy_backend"]
    arguments = ["bench", "bench.json", "--out", "result", *options, *plugins]
    result = _diffopt(arguments, tmp_path, path, TOY_BACKEND_LOG=str(log))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "result.json").read_text())
    rows = {row["name"]: row for row in summary["rows"]}
    assert rows["plugin cache"]["mac_fraction"] == pytest.approx(0.5)  # against "plain 4 steps", the reference
    ran = log.read_text().split()
    assert ran and set(ran) == {"full", "cached"} and ran.count("full") == ran.count("cached")  # period 2
    assert summary["plugins"] == {"toyplug.toy_pass": "--plugin", "toyplug.toy_backend": "--plugin"}
    assert f"`{summary['command']}`" in (tmp_path / "result.md").read_text()

    log.unlink()
    recorded = shlex.split(summary["command"])
    assert recorded[:2] == ["diffopt", "bench"]
    again = _diffopt(recorded[1:], tmp_path, path, TOY_BACKEND_LOG=str(log))
    assert again.returncode == 0, again.stderr
    assert log.read_text().split() == ran

    without = _diffopt(["bench", "bench.json", "--out", "other", *options], tmp_path, path)
    assert without.returncode == 2 and "backend must be one of ['compiled', 'torch'], found 'toy-counting'" in (
        without.stderr
    )
    missing = _diffopt(["info", "simple-dit", "--plugin", "toyplug.nothing_here"], tmp_path, path)
    assert missing.returncode == 2 and "cannot import plugin 'toyplug.nothing_here'" in missing.stderr


def test_an_installed_plugin_reaches_info_and_export_through_its_entry_points(tmp_path):
    path = _package(tmp_path / "site", installed=True)
    info = _diffopt(["info", "simple-dit"], tmp_path, path)
    assert info.returncode == 0, info.stderr
    assert "toyplug.toy_pass (entry point 'plugin-cache' in group 'diffopt.passes'): registers pass " in info.stdout
    assert "toyplug.toy_backend (entry point 'toy-counting' in group 'diffopt.backends'): registers backend" in (
        info.stdout
    )
    assert "toyplug.toy_runtime (entry point 'onnx-reference' in group 'diffopt.runtimes'): registers runtime" in (
        info.stdout
    )
    (tmp_path / "cache.passes.json").write_text(json.dumps({"passes": [{"pass": "PluginOutputCachePass"}]}))
    exported = _diffopt(["export", "simple-dit", "bundle", "--passes", "cache.passes.json"], tmp_path, path)
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"full", "cached"}
    sampled = _diffopt(["sample", "bundle", "--runtime", "onnx-reference", "--steps", "3", "--samples", "2"], tmp_path,
                       path)  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert "on onnx-reference (variants used: ['cached', 'full'])" in sampled.stdout
    assert (tmp_path / "samples.png").exists()

    named = _diffopt(["info", "simple-dit"], tmp_path, _package(tmp_path / "bare", installed=False),
                     DIFFOPT_PLUGINS="toyplug.toy_backend")  # fmt: skip
    assert named.returncode == 0, named.stderr
    assert "toyplug.toy_backend (DIFFOPT_PLUGINS): registers backend toy-counting" in named.stdout


def test_a_bundle_runtime_in_one_file_runs_a_bundle_by_name_like_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_package(tmp_path / "plugins", installed=False)))
    load_plugin("toyplug.toy_runtime")
    model = simple_dit()
    optimized = optimize(capture(model, (torch.randn(2, 1, 16, 16), torch.tensor([9, 5]), torch.tensor([0, 1]))))
    to_onnx(optimized, tmp_path / "bundle")
    sampler = Sampler(make_scheduler({"kind": "ddpm"}, num_steps=3))
    labels, shape = (torch.tensor([3, 7]),), (2, 1, 16, 16)
    samples = {}
    for runtime in ("onnxruntime", "onnx-reference"):
        denoiser = load_bundle(tmp_path / "bundle", runtime)
        assert denoiser.bundle.manifest.variants.keys() == {"full"}  # the manifest rides on the denoiser
        samples[runtime] = sampler.sample(denoiser, labels, shape=shape, seed=0)
    torch.testing.assert_close(samples["onnx-reference"], samples["onnxruntime"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"runtime must be one of \[.*'onnx-reference'.*\], found 'tensorrt'"):
        load_bundle(tmp_path / "bundle", "tensorrt")
    with pytest.raises(ValueError, match=r"'onnx-reference' is a bundle runtime: export the program"):
        optimize(capture(model, (torch.randn(2, 1, 16, 16), torch.tensor([9, 5]), torch.tensor([0, 1]))),
                 backend="onnx-reference")  # fmt: skip


def test_a_pass_file_names_a_pass_outside_diffopt_by_module_and_class(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_package(tmp_path / "plugins", installed=False)))
    (tmp_path / "p.json").write_text(json.dumps({"passes": [{"pass": "toyplug.toy_pass:PluginOutputCachePass"}]}))
    passes, _ = load_passes(tmp_path / "p.json")  # imports its module: no plugin option needed
    assert type(passes[0]).__name__ == "PluginOutputCachePass" and passes[0].period == 2
    assert pass_to_dict(passes[0]) == {"pass": "toyplug.toy_pass:PluginOutputCachePass"}  # written the same way
    (tmp_path / "bad.json").write_text(json.dumps({"passes": [{"pass": "toyplug.toy_pass:Nothing"}]}))
    with pytest.raises(ValueError, match=r"pass 'toyplug.toy_pass:Nothing': cannot import"):
        load_passes(tmp_path / "bad.json")
