"""Retires the test-only torchvision stub (tests/stubs) once ComfyUI has started.

ComfyUI imports torchvision while it loads its built-in nodes, so the stub must be on the path
then. Afterwards it must go: libraries that probe for torchvision (transformers, imported by
peft) would take the stub for the real thing and fail.
"""

import os
import sys

STUBS = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "stubs")


def _from_stub(module):
    return os.path.realpath(getattr(module, "__file__", None) or "/").startswith(STUBS + os.sep)


def retire():
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != STUBS]
    for name in [n for n in list(sys.modules) if n == "torchvision" or n.startswith("torchvision.")]:
        module = sys.modules.get(name)
        if module is not None and _from_stub(module):
            sys.modules.pop(name, None)
    # transformers (imported by ComfyUI at start-up) caches whether torchvision is installed.
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for name in ("is_torchvision_available", "is_torchvision_v2_available"):
        cached = getattr(import_utils, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
