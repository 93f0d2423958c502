"""Names ComfyUI's upscale-model loader imports; using them in a test is an error."""
import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def rotate(*args, **kwargs):
    raise NotImplementedError("torchvision is a test stub here; install the real torchvision")
