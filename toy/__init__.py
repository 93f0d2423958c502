"""The toy world: synthetic scenes with known objects (scenes.py), a small SD1.5-architecture
model trained on them (model.py, train.py, weights/), scoring of drags against the truth
(measure.py) and the demo (demo.py).

This folder is also a ComfyUI custom-node folder with one node, the toy model's loader, for the
demo, the tests and the quality benchmark; the pack itself never loads it.
"""


class ToyModelLoader:
    """Loads the toy model: MODEL, VAE and its fixed prompt (it has no text encoder)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "VAE", "CONDITIONING")
    RETURN_NAMES = ("model", "vae", "positive")
    FUNCTION = "load"
    CATEGORY = "DragNoise/toy"
    DESCRIPTION = "The small SD1.5-architecture model trained on synthetic scenes (toy/README.md)."

    def load(self):
        import sys
        from pathlib import Path

        # The toy's modules import one another as ``toy.*`` (the set decoder's builder too); here
        # this folder is loaded under ComfyUI's custom-node name, so make ``toy`` importable. Last on
        # the path: the repository's nodes/ must not shadow ComfyUI's nodes module.
        repo = str(Path(__file__).resolve().parents[1])
        if repo not in sys.path:
            sys.path.append(repo)
        from toy import model

        return model.load()


NODE_CLASS_MAPPINGS = {"DragNoiseToyModel": ToyModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DragNoiseToyModel": "DragNoise Toy Model (demo)"}
