"""Exported bundles inside pipelines: ``diffopt.export_pipeline(pipe, dir)`` after a call of an
enabled pipeline, then ``diffopt.enable(pipe, bundle=dir)`` runs it on onnxruntime (tiny parts)."""

import pytest
import torch
from test_pipelines import CASES, FAMILIES, _flux, _sd3, _text

import diffopt
from diffopt.passes.block_cache import BlockCachePass
from diffopt.runtime.denoiser import InputError

pytest.importorskip("onnxruntime")

PIPELINES = {  # a pipeline and one call of it
    "DiTPipeline": (CASES["DiTPipeline"].build, {"class_labels": [1, 2], "guidance_scale": 1.0}),
    "StableDiffusionPipeline (UNet, batched CFG)": (
        CASES["StableDiffusionPipeline"].build,
        {**_text(16), "height": 8, "width": 8, "guidance_scale": 2.0},
    ),
    "StableDiffusion3Pipeline": (_sd3, {**_text(16, pooled=8), "height": 8, "width": 8, "guidance_scale": 2.0}),
    "FluxPipeline (true CFG)": (
        _flux,
        {**_text(16, pooled=8), "height": 8, "width": 8, "true_cfg_scale": 2.0},
    ),
    "PixArtSigmaPipeline (masked attention)": (
        FAMILIES["PixArt-Sigma (masked)"].build,
        FAMILIES["PixArt-Sigma (masked)"].call,
    ),
    "SanaPipeline (masked attention)": (FAMILIES["Sana (masked)"].build, FAMILIES["Sana (masked)"].call),
}


def _latents(pipe, call):
    out = pipe(**call, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent")
    return torch.as_tensor(out.images)


@pytest.mark.parametrize("name", PIPELINES)
def test_an_exported_bundle_runs_as_the_pipelines_denoiser(name, tmp_path):
    build, call = PIPELINES[name]
    torch_program = diffopt.enable(build(), [BlockCachePass(period=2)])
    expected = _latents(torch_program, call)
    diffopt.export_pipeline(torch_program, tmp_path / "bundle")
    pipe = diffopt.enable(build(), bundle=tmp_path / "bundle", threads=1)
    got = _latents(pipe, call)
    assert float((got - expected).abs().max()) < 1e-4 * max(1.0, float(expected.abs().max()))
    runs = diffopt.summary(pipe).runs
    assert runs[-1].variants == ("full", "cached", "full", "cached")  # the bundle's own schedule ran
    denoiser = pipe.components["unet" if hasattr(pipe, "unet") else "transformer"].denoiser
    assert type(denoiser.backend).__name__ == "OnnxRuntimeBackend"


def test_a_bundle_refuses_calls_it_was_not_exported_for(tmp_path):
    build, call = PIPELINES["DiTPipeline"]
    with pytest.raises(ValueError, match="has not been called yet"):
        diffopt.export_pipeline(diffopt.enable(build()), tmp_path / "early")
    with pytest.raises(ValueError, match="is not enabled"):
        diffopt.export_pipeline(build(), tmp_path / "plain")
    pipe = diffopt.enable(build())
    _latents(pipe, call)
    diffopt.export_pipeline(pipe, tmp_path / "bundle", passes=[BlockCachePass(period=3)])  # other passes
    served = diffopt.enable(build(), bundle=tmp_path / "bundle", threads=1)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2])
    with pytest.raises(InputError, match="exported for cross_attention_kwargs=None and is now called with"):
        served.transformer(x, timestep=t, class_labels=labels, cross_attention_kwargs={"scale": 0.5})
    out = served.transformer(x, timestep=t, class_labels=labels)
    assert type(out).__name__ == "Transformer2DModelOutput" and out.sample.shape == x.shape
    with pytest.raises(ValueError, match="pass no passes"):
        diffopt.enable(build(), [BlockCachePass()], bundle=tmp_path / "bundle")
