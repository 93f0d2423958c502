"""The toy model: an SD1.5-architecture U-Net and a small VAE, built from ComfyUI's own classes
with fewer channels, trained by ``toy/train.py`` on the scenes of ``toy/scenes.py``.

Latent space. Scenes are rendered straight into SD1.5's latent layout (4 channels, 8x smaller
than the image): each latent pixel holds the mean colour of its 8x8 image block in an opponent
colour space plus the block's contrast (edges). The VAE (ComfyUI's TAESD architecture, which
has no normalization layers, so it can reproduce absolute colours that a 32-channel
AutoencoderKL's per-channel GroupNorm would erase) is trained to reproduce exactly that map
(encoder) and to paint the image back from it (decoder), so the U-Net can be trained on freshly
rendered latents without running an encoder, while the stock VAE Encode / VAE Decode nodes
still turn images into these latents and back.
"""

import os

import numpy as np
import torch

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy-sd15.safetensors")
IMAGE_SIZE = 256
WIDTHS = (32, 64, 96, 96)  # U-Net channels per level (SD1.5: 320, 640, 1280, 1280)
CONTEXT_DIM = 64
CONTEXT_TOKENS = 77
SCALE_FACTOR = 0.18215  # SD1.5's latent scale: model units = raw VAE units x this

# Opponent colour axes (luminance, red-green, yellow-blue) and their spread in model units.
_COLOUR_AXES = np.array([[1 / 3, 1 / 3, 1 / 3], [0.5, -0.5, 0.0], [0.25, 0.25, -0.5]], np.float32)
_COLOUR_GAIN = np.array([4.5, 7.0, 7.0], np.float32)
_CONTRAST_GAIN = 10.0


def unet_config(widths=WIDTHS):
    """The SD1.5 U-Net configuration ComfyUI detects for real checkpoints with fewer channels:
    ``widths`` channels per level (default 32 / 64 / 96 / 96) instead of 320 / 640 / 1280 / 1280,
    and a 64-wide prompt embedding instead of 768. At a top level of 32 channels every GroupNorm
    there (32 groups, as in every SD1.5) normalizes each channel alone; 64 / 64 / 64 / 64 pairs
    them (toy/FINDINGS.md, "A decoder that draws nothing of the map": a parametric decoder then
    reads its map more, its drags are no better)."""
    if any(w % widths[0] for w in widths):
        raise ValueError(f"each level's width must be a multiple of the top level's, not {widths}")
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4,
        "model_channels": widths[0], "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [w // widths[0] for w in widths],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
        "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def scene_latent(images):
    """The latent a scene image should have, in model units (raw VAE latent x 0.18215).

    Args:
        images: [B, H, W, 3] float in [0, 1], H and W multiples of 8.
    Returns:
        [B, 4, H/8, W/8] float32: 3 opponent-colour channels of each 8x8 block's mean colour and
        its luminance contrast (standard deviation), each spread to about unit scale.
    """
    x = torch.as_tensor(images, dtype=torch.float32).movedim(-1, 1)
    blocks = torch.nn.functional.avg_pool2d(x, 8)
    axes = torch.from_numpy(_COLOUR_AXES).to(x)
    colour = torch.einsum("ck,bkhw->bchw", axes, blocks - 0.5) * torch.from_numpy(_COLOUR_GAIN).to(x)[:, None, None]
    luminance = x.mean(1, keepdim=True)
    contrast = (torch.nn.functional.avg_pool2d(luminance ** 2, 8) - torch.nn.functional.avg_pool2d(luminance, 8) ** 2)
    contrast = contrast.clamp_min(0).sqrt() * _CONTRAST_GAIN - 0.8
    return torch.cat([colour, contrast], dim=1)


def build_unet(seed=0, heads=8, widths=WIDTHS):
    """A ComfyUI ``BaseModel`` (eps, SD15 latent format) with the toy U-Net, seeded init.

    ``heads``: attention heads per transformer. SD1.5's 8 heads leave 4 channels per head at the
    toy's width, which the CPU attention kernels run about twice as slow as 1 head of 32
    (BENCHMARKS.md); the weights' shapes are the same either way."""
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.SD15(unet_config(widths))
    config.unet_config["num_heads"] = heads  # after SD15's own, which sets 8
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    _init(base.diffusion_model, seed)
    return base


def build_autoencoder(seed=0):
    """ComfyUI's ``TAESD`` (8x downscale, 4 latent channels, no normalization layers), seeded
    init, with SD1.5's latent scale: its encoder then outputs model units directly."""
    import comfy.taesd.taesd

    ae = comfy.taesd.taesd.TAESD()
    _init(ae, seed)
    with torch.no_grad():
        ae.vae_scale.fill_(SCALE_FACTOR)
    return ae


@torch.no_grad()
def _init(module, seed):
    """Seeded fan-in scaled init (ComfyUI's layers skip initialization); zero for the last
    layer of each residual branch, so a fresh network starts near the identity."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            if name.endswith(("out_layers.3.weight", "proj_out.weight", "conv.4.weight")) or name == "out.2.weight":
                p.zero_()
        elif name.endswith("weight"):
            p.fill_(1.0)
        elif name != "vae_scale":
            p.zero_()


@torch.no_grad()
def rescale_bottleneck(unet, factor):
    """Multiplies the bottleneck (the mid block's output) by ``factor`` without changing what the
    U-Net computes (up to GroupNorm's eps): a reparametrization.

    From the lowest level's downsampling on, every residual branch starts with a normalization
    and ends with a linear layer, so scaling the downsampling convolution and each branch's last
    layer scales the whole residual stream through the mid block. The decoder's first three blocks
    read that stream (the bottleneck and the lowest level's skips) through a GroupNorm, blind to
    the scale, and a 1x1 convolution, whose weights on those channels are divided by ``factor``.
    Why: Bottleneck Optimize's Adam moves each bottleneck value by about the learning rate per
    step, so the bottleneck's scale decides how far a drag can reach in its steps.

    Args:
        unet: the toy's ``UNetModel`` (SD1.5 block layout), changed in place.
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock

    def scale(layer, weight=True):
        if weight:
            layer.weight.mul_(factor)
        if layer.bias is not None:
            layer.bias.mul_(factor)

    (down,) = unet.input_blocks[9]
    assert isinstance(down, Downsample), "expected SD1.5's block layout"
    scale(down.op)
    for module in [m for block in unet.input_blocks[10:] for m in block] + list(unet.middle_block):
        if isinstance(module, ResBlock):
            scale(module.out_layers[-1])
            if not isinstance(module.skip_connection, torch.nn.Identity):
                scale(module.skip_connection, weight=False)  # its input is scaled already
        elif isinstance(module, SpatialTransformer):
            scale(module.proj_out)
    for i, reader in enumerate(unet.output_blocks[:3]):
        res = reader[0]
        skip = unet.input_blocks[len(unet.output_blocks) - 1 - i][-1]
        skip_channels = skip.op.out_channels if isinstance(skip, Downsample) else skip.out_channels
        inputs = res.in_layers[0].num_channels
        first = 0 if i == 0 else inputs - skip_channels  # block 0 reads the bottleneck too
        group = inputs // res.in_layers[0].num_groups
        assert first % group == 0 and (inputs - skip_channels) % group == 0, "a GroupNorm group mixes scales"
        res.skip_connection.weight[:, first:].div_(factor)


def default_conditioning():
    """The toy's fixed prompt embedding [1, 77, 64] (the model has no text encoder)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn([1, CONTEXT_TOKENS, CONTEXT_DIM], generator=gen)


def conditioning():
    """The toy's fixed prompt as ComfyUI's CONDITIONING (what CLIP Text Encode would return)."""
    return [[default_conditioning(), {"pooled_output": torch.zeros([1, CONTEXT_DIM])}]]


def save(path, unet, autoencoder, metadata=None):
    """Writes both networks (fp16) into one safetensors file."""
    import safetensors.torch

    sd = {"unet." + k: v.detach().half().cpu().contiguous() for k, v in unet.state_dict().items()}
    sd.update({"vae." + k: v.detach().half().cpu().contiguous() for k, v in autoencoder.state_dict().items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file(sd, path, metadata={k: str(v) for k, v in (metadata or {}).items()})


def read(path=WEIGHTS):
    """(U-Net state dict, VAE state dict) in float32 from a weights file."""
    import comfy.utils

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No toy model at {path}; train it with `python toy/train.py` (see toy/README.md).")
    sd = comfy.utils.load_torch_file(path)
    return ({k[len("unet."):]: v.float() for k, v in sd.items() if k.startswith("unet.")},
            {k[len("vae."):]: v.float() for k, v in sd.items() if k.startswith("vae.")})


def metadata(path=WEIGHTS):
    """The settings ``train.py`` recorded in a weights file (all values strings)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def image_size(path=WEIGHTS):
    """The scenes' size in pixels a weights file was trained on (``train.py --image-size``; 256,
    the toy's world, if not recorded): drags on it should use scenes of that size."""
    return int(metadata(path).get("image_size", 256))


def trained_on_shaded(path=WEIGHTS):
    """Whether a weights file was trained on shaded objects (``train.py --shaded``, recorded in its
    metadata): drags on it should use shaded scenes too."""
    return metadata(path).get("shaded") == "True"


def scene_kinds(path=WEIGHTS):
    """The object kinds a weights file was trained on (``train.py --kinds``; all of
    ``toy.scenes.KINDS`` if not recorded): drags on it should use scenes of those."""
    from toy.scenes import KINDS

    kinds = metadata(path).get("kinds")
    return tuple(kinds.split(",")) if kinds else KINDS


def scene_palette(path=WEIGHTS):
    """The colours of a field-bottleneck model's world (``train.py --fields``: ``toy.fields.PALETTE``),
    or None for a model trained on free colours: drags on it should use scenes of those colours."""
    if metadata(path).get("fields") != "True":
        return None
    from toy.fields import PALETTE

    return PALETTE


def has_set_decoder(path=WEIGHTS):
    """Whether a weights file is a set-decoder model's (``toy.set_decoder``): it holds the encoder,
    and its decoder is built by code."""
    return metadata(path).get("decoder") == "set"


def scene_radii(path=WEIGHTS):
    """Each palette colour's radius in pixels in a set-decoder model's world (``toy.set_decoder``:
    every colour has its own), or None: drags on it should use scenes with those radii."""
    if not has_set_decoder(path):
        return None
    from toy.set_decoder import RADII

    return RADII


def scene_objects(path=WEIGHTS):
    """How many objects a weights file's scenes hold (``toy.set_decoder``'s world: one), or None
    where its world draws 1-3."""
    objects = metadata(path).get("objects")
    return int(objects) if objects else None


def attention_heads(path=WEIGHTS):
    """The attention heads a weights file was trained with (``train.py --heads``; 8 if not recorded)."""
    return int(metadata(path).get("attention_heads", 8))


def widths(path=WEIGHTS):
    """The U-Net's channels per level a weights file was trained with (``train.py --widths``;
    ``WIDTHS`` if not recorded)."""
    recorded = metadata(path).get("widths")
    return tuple(int(w) for w in recorded.split(",")) if recorded else WIDTHS


def load(path=WEIGHTS):
    """(MODEL, VAE, CONDITIONING) as ComfyUI's loaders and CLIP Text Encode would return them."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    unet_sd, vae_sd = read(path)
    if has_set_decoder(path):  # the file holds the encoder; the decoder is built
        from toy import set_decoder

        base = set_decoder.build_unet()
        set_decoder.load_encoder(base.diffusion_model, unet_sd)
    else:
        base = build_unet(heads=attention_heads(path), widths=widths(path))
        base.diffusion_model.load_state_dict(unet_sd)
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    vae = comfy.sd.VAE(sd=vae_sd)  # ComfyUI recognises TAESD by its keys
    return model, vae, conditioning()
