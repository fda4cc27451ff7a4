"""Small random-weight denoisers the tests capture (fast to build, fresh weights each time)."""

from __future__ import annotations

import torch

from diffopt.models.simple_dit import SimpleDiT

NO_EXTRA_CONDITIONS = {"resolution": None, "aspect_ratio": None}


def simple_dit(seed: int = 0):
    torch.manual_seed(seed)
    return SimpleDiT(hidden=32, depth=2, heads=2).eval()


def simple_dit_with_inputs():
    """A factory as ``diffopt info --model models:simple_dit_with_inputs`` calls it: a model and example inputs."""
    from diffopt.models.zoo import example_inputs

    return simple_dit(), example_inputs("dit-digits")


def diffusers_dit(seed: int = 0, num_layers: int = 2):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


def diffusers_pixart(seed: int = 0, additional_conditions: bool = False):
    """A tiny PixArt; ``additional_conditions``: it embeds ``added_cond_kwargs``' resolution and
    aspect-ratio tensors (PixArt-alpha at 1024 px)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12 if additional_conditions else 8,  # the two size embeddings take a third each
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24 if additional_conditions else 16,
        sample_size=8,
        patch_size=2,
        caption_channels=32,
        use_additional_conditions=additional_conditions,
        norm_type="ada_norm_single",
    ).eval()


def diffusers_sd3(seed: int = 0, num_layers: int = 3):
    """A tiny SD3 transformer: joint blocks pass two streams on (text, image); the last one
    ends the text stream."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def diffusers_flux(seed: int = 0):
    """A tiny Flux transformer (one joint and one single-stream block); diffusers computes its
    rotary tables in float64."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def diffusers_conditional_unet(seed: int = 0):
    """A tiny Stable Diffusion UNet (cross-attention on 16-wide text embeddings)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=8,
    ).eval()


def tiny_vae(latent_channels: int):
    """A one-level random VAE (8 x 8 images, latents the same size), for pipelines built offline."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
        shift_factor=0.0,  # SD3 and Flux shift latents by it
    ).eval()


def diffusers_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=11,
    ).eval()


def inputs_for(kind: str, batch: int, seed: int) -> dict:
    """Fresh random keyword inputs for one of the models above."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (batch,), generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    if kind == "simple_dit":
        return {"x": torch.randn(batch, 1, 16, 16, generator=g), "t": t, "y": labels}
    if kind == "diffusers_dit":
        return {"hidden_states": torch.randn(batch, 1, 8, 8, generator=g), "timestep": t, "class_labels": labels}
    if kind == "diffusers_pixart":
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": t,
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
            "added_cond_kwargs": NO_EXTRA_CONDITIONS,
        }
    if kind == "diffusers_sd3":
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": t,
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "pooled_projections": torch.randn(batch, 8, generator=g),
        }
    if kind == "diffusers_flux":  # a 4 x 4 grid of packed latents, 5 text tokens
        grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        return {
            "hidden_states": torch.randn(batch, 16, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "timestep": torch.rand(batch, generator=g),
            "img_ids": grid.reshape(16, 3),
            "txt_ids": torch.zeros(5, 3),
        }
    if kind == "diffusers_unet":
        return {"sample": torch.randn(batch, 1, 8, 8, generator=g), "timestep": t, "class_labels": labels}
    raise ValueError(kind)


MODEL_FACTORIES = {
    "simple_dit": simple_dit,
    "diffusers_dit": diffusers_dit,
    "diffusers_pixart": diffusers_pixart,
    "diffusers_unet": diffusers_unet,
}


def trained_twice(train, name: str, tmp_path, **recipe):
    """(a run of 2 steps, the same run interrupted after 1 step and resumed) of the reference
    model ``name`` with ``train`` (a training function of ``diffopt.evaluation``), tiny recipe."""
    import dataclasses

    from diffopt.models.zoo import get_spec

    spec = get_spec(name)
    spec = dataclasses.replace(spec, training={**spec.training, "steps": 2, "decay_start": 1, **recipe})
    straight = train(spec, tmp_path / "straight.pt")
    train(spec, tmp_path / "resumed.pt", steps=1)
    return straight, train(spec, tmp_path / "resumed.pt")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def run_along(optimized, steps) -> tuple[list, list]:
    """A fresh eager run of ``optimized`` through ``steps`` (each the inputs of one call):
    its outputs and the variant each step ran."""
    optimized.reset()
    outputs, variants = [], []
    for inputs in steps:
        outputs.append(optimized(*inputs))
        variants.append(optimized.last_variant)
    return outputs, variants


def max_relative(actual, expected) -> float:
    """The largest relative L2 error over pairs of tensors."""
    return max(float((a - e).norm() / e.norm()) for a, e in zip(actual, expected, strict=True))


def diffusers_sdxl_unet(seed: int = 0):
    """A tiny SDXL UNet: ``text_time`` added conditions (pooled text of width 8 and six size
    ids, each embedded to 4), a transformer depth of 2 in its cross-attention block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=4,
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 8,
    ).eval()


def diffusers_wan(seed: int = 0):
    """A tiny Wan 2.1 video transformer (3-d patches, rotary positions, text cross-attention)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=12,
        freq_dim=16,
        ffn_dim=24,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def diffusers_sana(seed: int = 0):
    """A tiny Sana transformer (linear attention, a masked text cross-attention)."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=12,
        sample_size=8,
        patch_size=1,
        norm_elementwise_affine=False,
    ).eval()


def diffusers_pixart_sigma(seed: int = 0):
    """A tiny PixArt-Sigma transformer: three blocks, patch 1, a wider caption than the alpha one."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=6,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        cross_attention_dim=12,
        sample_size=8,
        patch_size=1,
        caption_channels=20,
        use_additional_conditions=False,
        norm_type="ada_norm_single",
        interpolation_scale=0.5,
    ).eval()


def diffusers_controlnet(unet):
    """A tiny ControlNet made from ``unet`` (its conditioning image is not downsampled, so
    8 x 8 images meet 8 x 8 latents)."""
    from diffusers import ControlNetModel

    torch.manual_seed(7)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8,)).eval()


def dit_pipeline():
    """A DiTPipeline around a 3-block tiny DiT (DDIM)."""
    from diffusers import DDIMScheduler, DiTPipeline

    return DiTPipeline(transformer=diffusers_dit(seed=1, num_layers=3), vae=tiny_vae(1), scheduler=DDIMScheduler())


def stable_diffusion_pipeline():
    """A StableDiffusionPipeline around the tiny UNet (DDIM; prompt embeddings, no text encoder)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=diffusers_conditional_unet(seed=1),
        vae=tiny_vae(4),
        scheduler=DDIMScheduler(),
        text_encoder=None,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_clip(seed: int):
    """(text encoder, tokenizer): a random one-layer CLIP text model (8 wide, 4-wide projection)
    and a byte-level CLIP tokenizer of single characters, built offline."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode().values():
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval(), CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def sd3_pipeline_with_clip():
    """A StableDiffusion3Pipeline with two tiny random CLIP text encoders (no T5: SD3 fills
    its tokens with zeros), the tiny SD3 transformer and VAE: prompts in, images out."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    (encoder, tokenizer), (encoder_2, tokenizer_2) = tiny_clip(1), tiny_clip(2)
    return StableDiffusion3Pipeline(
        transformer=diffusers_sd3(seed=1),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(4),
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_encoder_2=encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def pixart_sigma_pipeline():
    """A PixArtSigmaPipeline around the tiny PixArt-Sigma transformer and VAE (DPM-Solver++,
    prompt embeddings, no text encoder)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    return PixArtSigmaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(4),
        transformer=diffusers_pixart_sigma(seed=1),
        scheduler=DPMSolverMultistepScheduler(),
    )
