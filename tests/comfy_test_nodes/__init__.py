"""Test-only ComfyUI nodes: load the seeded tiny SD1.5-layout model and its conditioning in a
real server, where no SD1.5 checkpoint can be downloaded. Loaded by ComfyUI's own loader from
the test server's custom_nodes; never shipped with the pack."""

from . import models, torchvision_stub

# ComfyUI loads custom nodes after its built-in ones, so the stub has done its job by now.
torchvision_stub.retire()


class TinySD15Model:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "DragNoise tests"

    def load(self, seed):
        return (models.build_model(seed=seed),)


class TinySD15Conditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "DragNoise tests"

    def encode(self, seed):
        return (models.random_conditioning(seed=seed),)


class TinySD15VAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "DragNoise tests"

    def load(self, seed):
        return (models.build_vae(seed=seed),)


NODE_CLASS_MAPPINGS = {
    "DragNoiseTestTinyVAE": TinySD15VAE,
    "DragNoiseTestTinyModel": TinySD15Model,
    "DragNoiseTestTinyConditioning": TinySD15Conditioning,
}
