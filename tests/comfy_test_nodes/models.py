"""SD1.5-architecture models with seeded random weights, built from ComfyUI's own classes.

SD 1.5 weights cannot be had on the test machines (SPEC §3); these models have SD1.5's exact
block layout, so every code path that depends on it (block indices, skip connections, the
supervision block, the 8x8 bottleneck at 512 px) is exercised for real.
"""

import math

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils

TINY_CHANNELS = 32
TINY_CONTEXT = 64


def sd15_unet_config(model_channels=320, context_dim=768):
    """The SD1.5 U-Net configuration ComfyUI detects for real checkpoints, channels scaled."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": context_dim,
        "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


@torch.no_grad()
def init_weights(module, seed):
    """Deterministic fan-in scaled normal weights (ComfyUI's layers skip initialization)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build_model(model_channels=TINY_CHANNELS, context_dim=TINY_CONTEXT, seed=0,
                model_type=None, latent_format=None, channel_mult=None):
    """A ComfyUI MODEL (``ModelPatcher``) with the SD1.5 layout and seeded random weights.

    ``model_type``, ``latent_format`` and ``channel_mult`` exist to make models that are *not*
    SD1.5-type, for the error tests.
    """
    config = sd15_unet_config(model_channels, context_dim)
    if channel_mult is not None:
        config["channel_mult"] = channel_mult
        n = len(channel_mult)
        config["num_res_blocks"] = [2] * n
        config["transformer_depth"] = [1] * (2 * n)
        config["transformer_depth_output"] = [1] * (3 * n)
    model_config = comfy.supported_models.SD15(config)
    if latent_format is not None:
        model_config.latent_format = latent_format
    base = comfy.model_base.BaseModel(model_config, model_type=model_type or comfy.model_base.ModelType.EPS)
    init_weights(base.diffusion_model, seed)
    base.eval()
    return comfy.model_patcher.ModelPatcher(
        base, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def random_conditioning(context_dim=TINY_CONTEXT, seed=0, tokens=77):
    """A CONDITIONING (as CLIP Text Encode outputs) holding a seeded random prompt embedding."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn([1, tokens, context_dim], generator=gen)
    return [[cond, {"pooled_output": torch.randn([1, context_dim], generator=gen)}]]


@torch.no_grad()
def write_random_sd15_checkpoint(path, seed=0):
    """Writes a full-size SD1.5 checkpoint (U-Net, VAE, CLIP text encoder; random weights, fp16)
    with the key names of original SD1.5 checkpoints, so stock loaders detect it as SD1.5."""
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip

    sd = {}
    unet = build_model(320, 768, seed).model.diffusion_model
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + k] = v.half()
    del unet
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(vae, seed + 1)
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v.half()
    del vae
    clip = comfy.sd1_clip.SDClipModel(device="cpu")
    init_weights(clip.transformer, seed + 2)
    for k, v in clip.transformer.state_dict().items():
        sd["cond_stage_model.transformer." + k] = v.half() if v.is_floating_point() else v
    del clip
    comfy.utils.save_torch_file(sd, str(path))


def build_vae(seed=0):
    """A ComfyUI VAE with SD1.5's VAE layout (8x downscale, 4 latent channels), 32 channels wide,
    seeded random weights."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    with torch.inference_mode(False), torch.no_grad():
        ae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        init_weights(ae, seed)
        sd = ae.state_dict()
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
