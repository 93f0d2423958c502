from ..dragnoise.features import DEFAULT_SUPERVISION, SUPERVISION_BLOCKS
from ..dragnoise.mask import combine_mask, decode_painted_mask
from ..dragnoise.optimize import MASK_WHEN_EMPTY, DragSettings, optimize_bottleneck
from ..dragnoise.points import NO_PAIRS, parse_points
from ..dragnoise.preview import draw_drag
from ..dragnoise.propagation import apply_propagation, propagated_sample
from . import types
from .preview import save_preview

HALT_STEP = ("INT", {"default": 10, "min": 0, "max": 1000, "tooltip":
             "Steps at the end of the schedule that run without the optimized bottleneck (the paper's t', "
             "default 10 of 50). Lower: stronger edit; higher: more of the original detail comes back. "
             "The steps left after the edit step (35 of 50 at strength 0.7) substitute nothing."})


class PointEditor:
    """Handle/target pairs and the editable-region mask for the image; the canvas widget
    (web/js/point_editor.js) edits the same ``points`` and ``mask`` text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image being edited; points and mask are in its pixels."}),
                "points": ("STRING", {"default": "[]", "multiline": True, "dynamicPrompts": False, "tooltip":
                           'Handle/target pairs in image pixels as JSON: [{"handle": [x, y], "target": [x, y]}, '
                           "...] (DragBench's flat list [[hx, hy], [tx, ty], ...] works too). The canvas "
                           "writes it: click a handle (red), then its target (blue)."}),
            },
            "optional": {
                "mask": ("STRING", {"default": "", "multiline": True, "dynamicPrompts": False, "tooltip":
                         "The painted region that may change, as written by the canvas's mask mode: JSON with "
                         '"paint" and "erase" layers in uncompressed COCO run-length encoding at the image\'s '
                         'size (see the README), or "" for none.'}),
                "base_mask": ("MASK", {"tooltip":
                              "Optional MASK to start from (1 = may change), at the image's size: painting adds "
                              "to it, erasing removes from it."}),
            },
        }

    RETURN_TYPES = (types.POINTS, "MASK")
    RETURN_NAMES = ("points", "mask")
    OUTPUT_TOOLTIPS = ("The pairs with the image size they refer to.",
                       "The editable region at the image's size: (base_mask OR painted) AND NOT erased; all "
                       "zeros when nothing is painted (Bottleneck Optimize then treats it as no mask).")
    FUNCTION = "points"
    CATEGORY = types.CATEGORY
    DESCRIPTION = ("Where to drag: each handle point (red) moves to its target point (blue); optionally paint "
                   "the region that may change.")

    def points(self, image, points, mask="", base_mask=None):
        _, height, width, _ = image.shape
        pairs = parse_points(points, width, height, image=image[0], allow_empty=True)
        paint, erase = decode_painted_mask(mask, width, height)
        editable = combine_mask(width, height, base_mask, paint, erase)
        ui = {"dragnoise_image": [save_preview(image[0], "image")]}
        if base_mask is not None:
            ui["dragnoise_base_mask"] = [save_preview(combine_mask(width, height, base_mask)[0], "base_mask")]
        return {"ui": ui, "result": (pairs, editable)}


class BottleneckOptimize:
    """Optimizes the U-Net bottleneck at the edit timestep so the handles move to the targets."""

    @classmethod
    def INPUT_TYPES(cls):
        d = DragSettings()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The same SD1.5-type model used for DDIM Invert."}),
                "inversion": (types.INVERSION, {"tooltip": "From DragNoise DDIM Invert (one image)."}),
                "points": (types.POINTS, {"tooltip": "From DragNoise Point Editor."}),
                "max_steps": ("INT", {"default": d.max_steps, "min": 0, "max": 1000, "tooltip":
                              "Most optimization steps; it stops earlier once every handle is within 2 feature "
                              "pixels (4 image pixels) of its target. 80 as in DragBench; raise it for long drags."}),
                "learning_rate": ("FLOAT", {"default": d.learning_rate, "min": 0.0001, "max": 1.0, "step": 0.001,
                                  "tooltip": "Adam learning rate for the bottleneck."}),
                "mask_lambda": ("FLOAT", {"default": d.mask_lambda, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip":
                                "Weight of the loss that keeps the area outside the mask unchanged "
                                "(0.1 in the authors' UI, 0.2 for DragBench). 0 turns it off (faster)."}),
                "mask_when_empty": (list(MASK_WHEN_EMPTY), {"default": d.mask_when_empty, "tooltip":
                                    "Without a mask: regularize the whole image as the authors' code does, "
                                    "or skip the mask loss as DragDiffusion does (faster, freer edits)."}),
                "motion_radius": ("INT", {"default": d.motion_radius, "min": 1, "max": 16, "tooltip":
                                  "r_m: half-size of the feature patch pulled one pixel towards the target."}),
                "tracking_radius": ("INT", {"default": d.tracking_radius, "min": 1, "max": 32, "tooltip":
                                    "r_p: half-size of the window where each handle is searched for after a step."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Region that may change (1 = editable), at the image's size. "
                                  "Draw one when the rest of the image must stay put."}),
                "supervision_block": (list(SUPERVISION_BLOCKS), {"default": DEFAULT_SUPERVISION, "tooltip":
                                      "Advanced: decoder block whose features are supervised (diffusers naming); "
                                      "the paper uses up_blocks.2."}),
            },
        }

    RETURN_TYPES = (types.EDIT, "IMAGE")
    RETURN_NAMES = ("edit", "preview")
    OUTPUT_TOOLTIPS = ("The optimized bottleneck and the tracking record, for the Propagated Sampler.",
                       "The source image with handles (red), targets (blue) and the tracked paths.")
    FUNCTION = "optimize"
    CATEGORY = types.CATEGORY
    DESCRIPTION = ("DragNoise's optimization: moves the handle features towards the targets by "
                   "optimizing only the U-Net mid-block output, with point tracking.")

    def optimize(self, model, inversion, points, max_steps, learning_rate, mask_lambda, mask_when_empty,
                 motion_radius, tracking_radius, mask=None, supervision_block=DEFAULT_SUPERVISION):
        if not points.handles:
            raise ValueError(NO_PAIRS)
        if mask is not None and not bool(mask.any()):
            mask = None  # nothing painted: no mask, so mask_when_empty decides
        settings = DragSettings(max_steps=max_steps, learning_rate=learning_rate, mask_lambda=mask_lambda,
                                mask_when_empty=mask_when_empty, motion_radius=motion_radius,
                                tracking_radius=tracking_radius, supervision_block=supervision_block)
        edit = optimize_bottleneck(model, inversion, points, mask, settings)
        start = edit.trajectory[0] if edit.trajectory else points.handles
        preview = draw_drag(points.image, start, points.targets, edit.trajectory, size=(points.width, points.height))
        # The tracking record also goes to the UI and to /history, for API users and the frontend.
        summary = {"steps_used": edit.steps_used, "max_steps": max_steps, "handles": edit.handles,
                   "targets": edit.targets, "final_distances": edit.final_distances, "trajectory": edit.trajectory}
        return {"ui": {"drag": [summary]}, "result": (edit, preview)}


class ApplyPropagation:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to sample with (a patched copy is returned)."}),
            "edit": (types.EDIT, {"tooltip": "From DragNoise Bottleneck Optimize."}),
            "halt_step": HALT_STEP,
        }}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model that substitutes the optimized bottleneck from the edit step to "
                       "the halt step. Sample the inverted latent with KSamplerAdvanced (add_noise disable, "
                       "ddim, ddim_uniform, cfg 1, same steps, start_at_step = the edit step).",)
    FUNCTION = "apply"
    CATEGORY = types.CATEGORY
    DESCRIPTION = "DragNoise propagation as a model patch, for stock samplers."

    def apply(self, model, edit, halt_step):
        return (apply_propagation(model, edit, halt_step),)


class PropagatedSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The same model used for DDIM Invert and Bottleneck Optimize."}),
            "inversion": (types.INVERSION, {"tooltip": "From DragNoise DDIM Invert."}),
            "edit": (types.EDIT, {"tooltip": "From DragNoise Bottleneck Optimize."}),
            "halt_step": HALT_STEP,
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The edited latent, for VAE Decode.",)
    FUNCTION = "sample"
    CATEGORY = types.CATEGORY
    DESCRIPTION = "DDIM denoising from the edit step that propagates the optimized bottleneck until the halt step."

    def sample(self, model, inversion, edit, halt_step):
        return ({"samples": propagated_sample(model, inversion, edit, halt_step)},)
