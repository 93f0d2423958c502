"""The pack over ComfyUI's HTTP API, on a real server subprocess."""

import torch

from conftest import COMFY_DIR, execution_error


def invert_prompt(strength=0.7, steps=50):
    """API-format prompt: tiny model -> empty latent -> DDIM Invert -> stock KSamplerAdvanced -> SaveLatent."""
    return {
        "1": {"class_type": "DragNoiseTestTinyModel", "inputs": {"seed": 0}},
        "2": {"class_type": "DragNoiseTestTinyConditioning", "inputs": {"seed": 0}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "DragNoiseDDIMInvert", "inputs": {
            "model": ["1", 0], "latent": ["3", 0], "positive": ["2", 0],
            "steps": steps, "inversion_strength": strength}},
        "5": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": 1.0,
            "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": ["2", 0], "negative": ["2", 0],
            "latent_image": ["4", 0], "start_at_step": steps - round(strength * steps), "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "dragnoise_invert"}},
    }


def test_invert_and_continue_over_http(server, node, tiny):
    import safetensors.torch

    outputs = server.run(invert_prompt())
    saved = outputs["6"]["latents"][0]
    path = server.root / "output" / saved["subfolder"] / saved["filename"]
    from_server = safetensors.torch.load_file(str(path))["latent_tensor"]
    # The same graph in-process gives the same latent.
    model, cond = tiny.build_model(seed=0), tiny.random_conditioning(seed=0)
    latent, inversion = node("DragNoiseDDIMInvert", model=model, latent={"samples": torch.zeros(1, 4, 8, 8)},
                             positive=cond, steps=50, inversion_strength=0.7)
    (local,) = node("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=50, cfg=1.0,
                    sampler_name="ddim", scheduler="ddim_uniform", positive=cond, negative=cond,
                    latent_image=latent, start_at_step=inversion.edit_step, end_at_step=10000,
                    return_with_leftover_noise="disable")
    assert from_server.shape == (1, 4, 8, 8)
    assert torch.allclose(from_server, local["samples"], rtol=1e-4, atol=1e-4)


def test_bad_input_error_reaches_api_user(server):
    prompt = invert_prompt()
    prompt["4"]["inputs"]["inversion_strength"] = 0.01  # rounds to no inversion step at 50 steps
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error["node_type"] == "DragNoiseDDIMInvert"
    assert error["exception_message"].startswith("inversion_strength: ")


def upload_png(server, image, name):
    """Uploads a [H, W, 3] float image through /upload/image, as the UI does."""
    import io
    import uuid

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    reply = server.request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    import json

    return json.loads(reply)["name"]


def drag_prompt(image_name, points_json, max_steps=3):
    """Load image -> VAE Encode -> DDIM Invert -> Point Editor -> Bottleneck Optimize ->
    Propagated Sampler -> VAE Decode -> Save Image, plus the optimization preview."""
    return {
        "1": {"class_type": "DragNoiseTestTinyModel", "inputs": {"seed": 0}},
        "2": {"class_type": "DragNoiseTestTinyConditioning", "inputs": {"seed": 0}},
        "3": {"class_type": "DragNoiseTestTinyVAE", "inputs": {"seed": 0}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["3", 0]}},
        "6": {"class_type": "DragNoiseDDIMInvert", "inputs": {
            "model": ["1", 0], "latent": ["5", 0], "positive": ["2", 0], "steps": 50, "inversion_strength": 0.7}},
        "7": {"class_type": "DragNoisePointEditor", "inputs": {"image": ["4", 0], "points": points_json}},
        "8": {"class_type": "DragNoiseBottleneckOptimize", "inputs": {
            "model": ["1", 0], "inversion": ["6", 1], "points": ["7", 0], "max_steps": max_steps,
            "learning_rate": 0.01, "mask_lambda": 0.1, "mask_when_empty": "regularize whole image",
            "motion_radius": 1, "tracking_radius": 3}},
        "9": {"class_type": "DragNoisePropagatedSampler", "inputs": {
            "model": ["1", 0], "inversion": ["6", 1], "edit": ["8", 0], "halt_step": 10}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["3", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "dragnoise_edit"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["8", 1], "filename_prefix": "dragnoise_preview"}},
    }


def view(server, saved):
    import io
    import urllib.parse

    from PIL import Image

    query = urllib.parse.urlencode({"filename": saved["filename"], "subfolder": saved["subfolder"], "type": saved["type"]})
    return Image.open(io.BytesIO(server.request(f"/view?{query}")))


def test_drag_edit_end_to_end_over_http(server):
    gen = torch.Generator().manual_seed(0)
    name = upload_png(server, torch.rand(64, 64, 3, generator=gen), "dragnoise_source.png")
    outputs = server.run(drag_prompt(name, '[{"handle": [16, 20], "target": [44, 36]}]'))
    edited = view(server, outputs["11"]["images"][0])
    preview = view(server, outputs["12"]["images"][0])
    assert edited.size == (64, 64) and preview.size == (64, 64)
    red = preview.convert("RGB").getpixel((16, 20))
    assert red[0] > 200 and red[2] < 80  # the handle is drawn on the preview


def test_bad_points_error_reaches_api_user(server):
    name = upload_png(server, torch.rand(64, 64, 3), "dragnoise_source2.png")
    entry = server.wait(server.queue(drag_prompt(name, '[{"handle": [16, 20], "target": [90, 36]}]')))
    error = execution_error(entry)
    assert error["node_type"] == "DragNoisePointEditor"
    assert error["exception_message"].startswith("points: pair 1 target (90, 36) lies outside the 64x64 image")


def test_lora_fit_drag_edit_over_http_and_cached_rerun(server):
    import uuid

    name = upload_png(server, torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)), "dragnoise_lora.png")
    prompt = drag_prompt(name, '[{"handle": [16, 20], "target": [44, 36]}]', max_steps=2)
    save_name = f"http-test-{uuid.uuid4().hex[:8]}"
    prompt["13"] = {"class_type": "DragNoiseLoRAFit", "inputs": {
        "model": ["1", 0], "latent": ["5", 0], "positive": ["2", 0], "steps": 3, "learning_rate": 2e-4, "rank": 4,
        "batch_size": 1, "seed": 0, "save_name": save_name}}
    for node_id in ("6", "8", "9"):
        prompt[node_id]["inputs"]["model"] = ["13", 0]
    try:
        outputs = server.run(prompt)
        assert view(server, outputs["11"]["images"][0]).size == (64, 64)
        loras = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
        assert f"dragnoise/{save_name}.safetensors" in loras
        # The same prompt again: ComfyUI's cache answers, nothing is trained or sampled again.
        entry = server.wait(server.queue(prompt))
        cached = [data for kind, data in entry["status"]["messages"] if kind == "execution_cached"]
        assert "13" in cached[0]["nodes"] and "9" in cached[0]["nodes"]
    finally:
        # The server saves into the first loras folder, the ComfyUI install's own.
        (COMFY_DIR / "models" / "loras" / "dragnoise" / f"{save_name}.safetensors").unlink(missing_ok=True)
