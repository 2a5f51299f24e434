"""Issue 3's last seed systems end to end on Prefect's ephemeral API:
LLaVA-NeXT with a Mistral LLM, and LLaVA-NeXT-Video (frames sampled from a
video, each through CLIP + pooling + projector, video tokens in the prompt).
Real engines (aoti LLMs; visual encoders on aoti or onnxruntime) against
Hugging Face `generate` on the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from enginefarm.cli import main as cli
from enginefarm.images import write_image
from enginefarm.store import open_store
from enginefarm.testing import write_tiny

ROOT = Path(__file__).resolve().parent.parent


def _recipe(dest: Path, name: str, template: str, src: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "models" / "tiny" / f"{template}.yaml").read_text())
    data.update(name=name, source={"path": str(src)}, **changes)
    p = dest / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _manifest(store: Path, recipe: str, step: str) -> dict:
    st = open_store(str(store))
    rows = st.list_manifests(recipe, step)
    assert len(rows) == 1, rows
    return st.get_manifest(*rows[0])


# ----------------------------------------------------------------------------- LLaVA-NeXT with Mistral


def test_llava_next_with_mistral_builds_runs_and_equals_hf_generate(tmp_path, capsys):
    import transformers
    from PIL import Image

    src = write_tiny("llava-next-mistral", tmp_path / "src", seed=5)
    assert json.loads((src / "config.json").read_text())["text_config"]["model_type"] == "mistral"
    # the visual engine on onnxruntime (no second compile); the LLM on aoti
    validation = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-llava-next.yaml").read_text())["validation"]
    validation["gates"]["visual_max_abs_diff"] = 1e-3  # fp32 rounding of this seed's larger features
    p = _recipe(tmp_path, "mm-next-mistral", "tiny-llava-next", src, validation=validation,
                components={"visual": {"backend": "onnxruntime"}, "llm": {}})
    store = tmp_path / "store"
    assert cli(["build", str(p), "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"]["fp32-tp1"]["validation"] is True

    # converted by the mistral family: its architecture, and its 24-token window
    # (which the 36 to 88 image features make bind)
    f = _manifest(store, "mm-next-mistral", "convert")["files"]["config.json"]
    open_store(str(store)).get_blob_file(f["sha256"], tmp_path / "ckpt.json", size=f["size"])
    cfg = json.loads((tmp_path / "ckpt.json").read_text())
    assert cfg["architecture"] == "MistralForCausalLM" and cfg["max_attention_window_size"] == [24, 24]
    val = _manifest(store, "mm-next-mistral", "validate")["results"]["metrics"]
    assert val["greedy_equal"] and val["greedy_batched_equal"] and val["logits_max_abs_diff"] < 1e-3
    assert val["visual_max_abs_diff"] < 1e-3 and len(set(val["visual_features_by_image"])) == 3

    img = write_image("rings", tmp_path / "wide.png", size=90, height=40)
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    assert cli(["run", "mm-next-mistral", "--store", str(store), "--image", str(img), "--prompt", prompt,
                "--max-new-tokens", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
    proc = transformers.AutoProcessor.from_pretrained(src)
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    enc = proc(images=[Image.open(img).convert("RGB")], text=[prompt], return_tensors="pt")
    assert enc["input_ids"].shape[1] > 24  # the window binds
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=1)
    assert got == want[0, enc["input_ids"].shape[1]:].tolist()
