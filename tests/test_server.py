"""The pack over ComfyUI's HTTP API, on a real server subprocess."""

import torch

from conftest import execution_error


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
