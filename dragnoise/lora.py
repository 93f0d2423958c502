"""Per-image LoRA (SPEC §1.5): fit LoRA adapters on the input image so that inversion and
reconstruction keep it faithful, then hand them to ComfyUI as ordinary LoRA weight patches.

The adapters are injected with peft into a training copy of the U-Net (the user's model is never
touched). The result is written in the kohya key format (``lora_unet_<diffusers name>``) that
ComfyUI's stock LoraLoader reads, and the in-graph MODEL is patched through that same loader
function, so a saved file and the in-graph model compute the same thing.
"""

import copy
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import comfy_compat
from .features import backward_with_fallback
from .model_check import check_latent, check_settings, sd15_unet

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
MIN_CROP = 8  # latent pixels (64 image pixels)
MAX_CROP = 64  # latent pixels (512 image pixels)
FORMAT_VERSION = "1"


@dataclass
class LoRASettings:
    """Defaults of the DragBench reference (SPEC §1.5)."""
    steps: int = 200
    learning_rate: float = 2e-4
    rank: int = 16
    batch_size: int = 1
    seed: int = 0

    def check(self):
        checks = [
            ("steps", isinstance(self.steps, int) and 1 <= self.steps <= 10000, "from 1 to 10000"),
            ("learning_rate", 0 < self.learning_rate <= 0.1, "in (0, 0.1]"),
            ("rank", isinstance(self.rank, int) and 1 <= self.rank <= 256, "from 1 to 256"),
            ("batch_size", isinstance(self.batch_size, int) and 1 <= self.batch_size <= 64, "from 1 to 64"),
        ]
        check_settings(self, checks)


def latent_hash(latent_samples):
    """Short sha256 of the image's latent ([1, 4, h, w]), recorded in saved LoRAs."""
    data = latent_samples.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data + str(tuple(latent_samples.shape)).encode()).hexdigest()[:16]


def prompt_hash(positive):
    data = positive[0][0].detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def metadata_for(settings, latent_samples, positive):
    meta = {f"dragnoise.{k}": str(v) for k, v in asdict(settings).items()}
    meta.update({"dragnoise.image_hash": latent_hash(latent_samples), "dragnoise.prompt_hash": prompt_hash(positive),
                 "dragnoise.format": FORMAT_VERSION, "dragnoise.target_modules": json.dumps(TARGET_MODULES)})
    return meta


def _random_crops(z0, crop, batch, gen):
    """[batch, 4, crop, crop] random crops of z0 [1, 4, h, w] (offsets from ``gen``)."""
    _, _, h, w = z0.shape
    rows = torch.randint(0, h - crop + 1, [batch], generator=gen).tolist()
    cols = torch.randint(0, w - crop + 1, [batch], generator=gen).tolist()
    return torch.cat([z0[:, :, r:r + crop, c:c + crop] for r, c in zip(rows, cols)])


def fit_lora(model, latent_samples, positive, settings=None):
    """Fits LoRA adapters on one image.

    Args:
        model: ComfyUI ``ModelPatcher`` of an SD1.5-type model (never modified).
        latent_samples: [1, 4, h, w] raw VAE latent of the image (VAE Encode).
        positive: CONDITIONING with the prompt.
    Returns:
        (LoRA state dict in kohya format {key: tensor}, list of per-step losses)
    """
    settings = settings or LoRASettings()
    settings.check()
    unet = sd15_unet(model)
    check_latent(latent_samples)
    if latent_samples.shape[0] != 1:
        raise ValueError(f"latent: LoRA Fit takes one image, got a batch of {latent_samples.shape[0]}.")
    h, w = latent_samples.shape[-2:]
    crop = min(MAX_CROP, h, w)
    if crop < MIN_CROP:
        raise ValueError(f"latent: the image is {w * 8}x{h * 8} px; LoRA Fit needs at least {MIN_CROP * 8}x{MIN_CROP * 8}.")
    if not positive:
        raise ValueError("positive: empty CONDITIONING; connect a CLIP Text Encode with the prompt.")

    state, losses = _train(model, unet, latent_samples, positive, settings, crop)
    comfy_compat.soft_empty_cache()  # the training copy is gone once _train returns
    return state, losses


def _train(model, unet, latent_samples, positive, settings, crop):
    from peft import LoraConfig, inject_adapter_in_model

    comfy_compat.load_model(model)
    device, dtype = model.load_device, comfy_compat.compute_dtype(model)
    ms = comfy_compat.model_sampling(model)
    alphas_cumprod = (1.0 / (1.0 + ms.sigmas.float() ** 2)).to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    losses = []
    with torch.inference_mode(False):
        # A private copy in normal (non-inference) tensors, which autograd can work through.
        trainee = copy.deepcopy(unet)
        trainee.requires_grad_(False)
        config = LoraConfig(r=settings.rank, lora_alpha=settings.rank, target_modules=TARGET_MODULES,
                            init_lora_weights=True)
        with torch.random.fork_rng(devices=[]):  # seeded adapter init, global RNG left alone
            torch.manual_seed(settings.seed)
            trainee = inject_adapter_in_model(config, trainee)
        params = [p for n, p in trainee.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=1e-2)
        z0 = model.model.latent_format.process_in(latent_samples.float()).to(device)
        context = positive[0][0].to(device, dtype).clone()  # CLIP Text Encode's output is an inference tensor
        pbar = comfy_compat.progress_bar(settings.steps)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def forward_backward(zt, t, noise):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                eps = trainee(zt.to(dtype), timesteps=t.float().to(device),
                              context=context.expand(settings.batch_size, -1, -1))
            loss = F.mse_loss(eps.float(), noise)
            loss.backward()
            return loss.detach()

        for step in range(settings.steps):
            comfy_compat.throw_if_interrupted()
            x0 = _random_crops(z0, crop, settings.batch_size, gen)
            t = torch.randint(0, len(alphas_cumprod), [settings.batch_size], generator=gen)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            ab = alphas_cumprod[t.to(device)].view(-1, 1, 1, 1)
            zt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            loss = backward_with_fallback(trainee, lambda: forward_backward(zt, t, noise))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            pbar.update(1)
            if step % 10 == 0 or step == settings.steps - 1:
                logging.info(f"DragNoise LoRA step {step + 1}/{settings.steps}: loss {losses[-1]:.4f}")
        return _kohya_state_dict(trainee, model, settings.rank), losses


def _kohya_state_dict(trainee, model, rank):
    """{lora_unet_<diffusers name>.lora_down/lora_up/alpha: tensor} from the peft-injected copy."""
    import comfy.utils

    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}
    state = {}
    for name, module in trainee.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        diffusers_name = to_diffusers[name + ".weight"][:-len(".weight")]
        key = "lora_unet_" + diffusers_name.replace(".", "_")
        state[key + ".lora_down.weight"] = module.lora_A["default"].weight.detach().float().cpu().contiguous()
        state[key + ".lora_up.weight"] = module.lora_B["default"].weight.detach().float().cpu().contiguous()
        state[key + ".alpha"] = torch.tensor(float(rank))
    return state


def apply_lora(model, state):
    """A clone of ``model`` carrying the LoRA as ComfyUI weight patches, exactly as LoraLoader does."""
    return comfy_compat.load_lora(model, state)


def check_save_target(path, metadata):
    """The metadata of the LoRA already at ``path`` (None if there is none); raises if it is a
    different LoRA, which is never overwritten."""
    existing = read_metadata(path)
    if existing is not None and existing != metadata:
        raise ValueError(f"save_name: {path} already holds a different LoRA "
                         f"({_describe(existing)}); choose another save_name or delete that file.")
    return existing


def save_lora(path, state, metadata):
    """Writes the LoRA; refuses to overwrite a file that holds a different LoRA."""
    import safetensors.torch

    check_save_target(path, metadata)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    safetensors.torch.save_file(state, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path):
    """The file's dragnoise.* metadata, or None if it does not exist."""
    import safetensors

    if not os.path.isfile(path):
        return None
    with safetensors.safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return {k: v for k, v in meta.items() if k.startswith("dragnoise.")}


def load_state(path):
    import safetensors.torch

    return safetensors.torch.load_file(path)


def _describe(meta):
    keys = ("steps", "learning_rate", "rank", "batch_size", "seed", "image_hash")
    return ", ".join(f"{k}={meta.get('dragnoise.' + k, '?')}" for k in keys)
