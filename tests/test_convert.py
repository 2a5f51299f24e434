"""HF -> TensorRT-LLM checkpoint conversion, and the PyTorch decoder that
runs it, against the Hugging Face model."""

import json

import pytest
import torch
from safetensors import safe_open

from enginefarm.checkpoint import convert_checkpoint, load_rank
from enginefarm.errors import BadInput
from enginefarm.families import get_family
from enginefarm.runtime.decoder import DecoderLM
from enginefarm.spec import Variant
from enginefarm.testing import write_tiny


def V(tp=1, dtype="float32"):
    return Variant(name=f"x-tp{tp}", backend="aoti", dtype=dtype, quant="none", tp=tp, target="cpu")


@pytest.mark.parametrize("name,family", [("opt", "opt"), ("llama", "llama"), ("llama-tied", "llama")])
def test_converted_checkpoint_matches_hf(tmp_path, name, family):
    from transformers import AutoModelForCausalLM

    src = write_tiny(name, tmp_path / "src", seed=7)
    convert_checkpoint(get_family(family), src, tmp_path / "ckpt", V())
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["mapping"]["tp_size"] == 1 and cfg["quantization"]["quant_algo"] is None
    with safe_open(str(tmp_path / "ckpt" / "rank0.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.layers.0.attention.qkv.weight" in keys and "lm_head.weight" in keys
    model = DecoderLM.from_checkpoint(tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 11]])
    kc, vc = model.new_cache(1, 32)
    with torch.no_grad():
        lg, kc, vc = model(ids, torch.tensor([0]), kc, vc)
        ref = hf(ids).logits
        assert (lg - ref).abs().max() < 1e-4
        # one decode step with the cache equals a full forward
        nxt = torch.tensor([[77]])
        lg2, _, _ = model(nxt, torch.tensor([ids.shape[1]]), kc, vc)
        ref2 = hf(torch.cat([ids, nxt], 1)).logits[:, -1]
        assert (lg2[:, 0] - ref2).abs().max() < 1e-4


def test_tp_shards_reassemble_to_tp1(tmp_path):
    src = write_tiny("llama", tmp_path / "src", seed=1)  # 4 heads, 2 kv heads
    fam = get_family("llama")
    convert_checkpoint(fam, src, tmp_path / "tp1", V(1))
    convert_checkpoint(fam, src, tmp_path / "tp2", V(2))
    _, w1 = load_rank(tmp_path / "tp1", 0)
    _, a = load_rank(tmp_path / "tp2", 0)
    _, b = load_rank(tmp_path / "tp2", 1)
    n = "transformer.layers.0."
    # row-parallel: split on the input dim; column-parallel: on the output dim
    assert torch.equal(torch.cat([a[n + "attention.dense.weight"], b[n + "attention.dense.weight"]], 1), w1[n + "attention.dense.weight"])
    assert torch.equal(torch.cat([a[n + "mlp.fc.weight"], b[n + "mlp.fc.weight"]], 0), w1[n + "mlp.fc.weight"])
    # fused qkv: each rank holds its q heads, then its k and v heads
    q1, k1, v1 = w1[n + "attention.qkv.weight"].split([64, 32, 32])
    qa, ka, va = a[n + "attention.qkv.weight"].split([32, 16, 16])
    qb, kb, vb = b[n + "attention.qkv.weight"].split([32, 16, 16])
    assert torch.equal(torch.cat([qa, qb]), q1) and torch.equal(torch.cat([ka, kb]), k1) and torch.equal(torch.cat([va, vb]), v1)


def test_tp_beyond_kv_heads_replicates_them(tmp_path):
    src = write_tiny("llama", tmp_path / "src", seed=1)  # 2 kv heads
    convert_checkpoint(get_family("llama"), src, tmp_path / "tp4", V(4))
    _, w0 = load_rank(tmp_path / "tp4", 0)
    _, w1 = load_rank(tmp_path / "tp4", 1)
    n = "transformer.layers.0.attention.qkv.weight"
    # 4 q heads / 4 ranks = 1 (16 rows) + one replicated kv head each (16 + 16)
    assert w0[n].shape[0] == 48 and torch.equal(w0[n][16:32], w1[n][16:32])


def test_tp_not_dividing_heads_is_refused(tmp_path):
    src = write_tiny("llama-tied", tmp_path / "src")  # 6 heads, 3 kv heads
    with pytest.raises(BadInput, match="tp size 4 does not divide the model's 6 attention heads"):
        convert_checkpoint(get_family("llama"), src, tmp_path / "o", V(4))
    assert not (tmp_path / "o" / "rank0.safetensors").exists()


def test_pickled_weights_are_refused(tmp_path):
    src = write_tiny("opt", tmp_path / "src")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(BadInput, match="pickled .bin weights"):
        convert_checkpoint(get_family("opt"), src, tmp_path / "o", V())


def test_corrupt_safetensors_is_bad_input(tmp_path):
    src = write_tiny("opt", tmp_path / "src")
    (src / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BadInput, match="corrupt safetensors"):
        convert_checkpoint(get_family("opt"), src, tmp_path / "o", V())
