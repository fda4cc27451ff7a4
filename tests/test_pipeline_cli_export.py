"""``diffopt export --pipeline DIR BUNDLE --passes FILE`` on saved tiny pipelines, then
``diffopt.enable(pipe, bundle=BUNDLE)`` runs the bundle within 1e-4 of the torch program."""

import pytest
import torch
from test_pipeline_bundles import PIPELINES
from test_pipeline_cli import _save

import diffopt
from diffopt.cli import main
from diffopt.passes.block_cache import BlockCachePass
from diffopt.passes.registry import save_passes
from diffopt.pipelines.loading import load_pipeline
from diffopt.pipelines.workload import run_call

pytest.importorskip("onnxruntime")

EXPORTED = ["StableDiffusion3Pipeline", "StableDiffusionPipeline (UNet, batched CFG)", "FluxPipeline (true CFG)"]
EXPORTED += ["PixArtSigmaPipeline (masked attention)", "SanaPipeline (masked attention)"]


@pytest.mark.parametrize("name", EXPORTED)
def test_export_pipeline_with_a_pass_file_then_enable_the_bundle(name, tmp_path):
    build, call = PIPELINES[name]
    directory = _save(build, tmp_path / "pipe")
    torch.save([{**call, "seed": 0, "output_type": "latent"}], tmp_path / "calls.pt")  # PixArt-Sigma has no VAE
    save_passes(tmp_path / "p.passes.json", [BlockCachePass(period=2)], steps=4)
    main(
        ["export", "--pipeline", str(directory), str(tmp_path / "bundle"), "--passes", str(tmp_path / "p.passes.json")]
        + ["--calls", str(tmp_path / "calls.pt")]
    )
    latents = {**call, "seed": 3, "output_type": "latent"}
    expected = run_call(diffopt.enable(load_pipeline(directory), [BlockCachePass(period=2)]), latents, 4)
    served = diffopt.enable(load_pipeline(directory), bundle=tmp_path / "bundle", threads=1)
    got = run_call(served, latents, 4)
    assert float((got - expected).abs().max()) < 1e-4 * max(1.0, float(expected.abs().max()))
    assert diffopt.summary(served).runs[-1].variants == ("full", "cached", "full", "cached")
