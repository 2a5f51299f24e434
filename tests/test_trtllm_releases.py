"""What the installed TensorRT-LLM release would reject, refused before
trtllm-build runs: weight-only layers whose widths it pads, and W8A16 per
group where its quantizer lacks the int8 group-wise layout. TensorRT-LLM
cannot be installed here: the facts of its releases are stated below with
the tag and line they were read at, and the farm's checkpoints are real."""

from __future__ import annotations

import pytest

from enginefarm.backends.tensorrt_llm import (RELEASES, TensorRTLLM, groupwise_init_params, groupwise_int8_refusal,
                                              padded_layers)
from enginefarm.checkpoint import convert_checkpoint
from enginefarm.errors import BadInput
from enginefarm.families import get_family
from enginefarm.spec import Variant
from enginefarm.testing import write_tiny

# The names quantization/quantize.py `weight_only_groupwise_quantize` gives
# the group-wise linear layers it creates (its init_params["..."] assignments),
# read at two tags: v0.14.0 (b0880169, lines 128-134) and v0.15.0 (8f91cff2,
# lines 132-140, the same at main be178810 of 2024-12-16).
AT_V0_14_0 = {"group_size", "pre_quant_scale", "zero", "use_w4a8_awq", "tp_rank"}
AT_V0_15_0 = AT_V0_14_0 | {"use_int8_weight"}


def variant(quant, tp, group=None, name="t") -> Variant:
    return Variant(name=name, backend="tensorrt-llm", dtype="float16", quant=quant, tp=tp, target="sm_90",
                   group_size=group)


def test_w8a16_per_group_needs_the_release_whose_quantizer_passes_use_int8_weight():
    why = groupwise_int8_refusal(AT_V0_14_0)
    assert why and "use_int8_weight" in why and "0.15.0 or newer" in why
    assert groupwise_int8_refusal(AT_V0_15_0) is None
    assert "no weight_only_groupwise_quantize" in groupwise_int8_refusal(None)
    assert "0.15.0" in RELEASES["weight-only per group"]["range"]
    # the reading of a quantize.py: the assignments inside the function,
    # nested helpers and a subscript split over two lines included (a source
    # written here, shaped as the releases' are)
    src = '''
def other(init_params):
    init_params["not_this"] = 1

def weight_only_groupwise_quantize(model, cfg):
    def helper(init_params, name, module):
        init_params["group_size"] = cfg.a
        init_params[
            "use_int8_weight"] = cfg.b == 2
        if "tp_rank" in init_params:
            init_params["tp_rank"] = cfg.c
        extra = {"x": 1}
    return helper
'''
    assert groupwise_init_params(src) == {"group_size", "use_int8_weight", "tp_rank"}
    assert groupwise_init_params("def weight_only_quantize(model):\n    return model\n") is None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Real converted checkpoints: a tiny llama (hidden 64, MLP 160, 8 heads
    of 8 and 2 kv heads: fused qkv 96 wide) at tp 1; a GPT-2 of width 128
    (qkv 384, MLP 512) at tp 2, per channel and per group of 64; a tiny T5
    (both parts) at tp 2."""
    root = tmp_path_factory.mktemp("pad")
    llama = write_tiny("llama-h8", root / "llama", seed=1)
    gpt2 = write_tiny("gpt2", root / "gpt2", seed=1, hidden=128, heads=4)
    t5 = write_tiny("t5", root / "t5", seed=1)
    out = {}
    for key, fam, src, v in (("llama-tp1", "llama", llama, variant("w8a16", 1)),
                             ("gpt2-tp2", "gpt2", gpt2, variant("w8a16", 2)),
                             ("gpt2-g64-tp2", "gpt2", gpt2, variant("w4a16", 2, 64)),
                             ("gpt2-w8g64-tp2", "gpt2", gpt2, variant("w8a16", 2, 64)),
                             ("t5-tp2", "t5", t5, variant("w8a16", 2))):
        out[key] = root / key
        convert_checkpoint(get_family(fam), src, out[key], v)
    return out


def test_widths_tensorrt_llm_pads_are_listed(checkpoints):
    """TensorRT-LLM rounds a quantized linear's full widths up to 64 x tp (per
    channel) or max(64, group_size) x tp (per group) and declares the padded
    shape; the farm's checkpoint holds the unpadded one."""
    layer0 = [p for p in padded_layers(checkpoints["llama-tp1"]) if "layers.0." in p]
    assert layer0 == ["transformer.layers.0.attention.qkv: 64 x 96 not multiples of 64",
                      "transformer.layers.0.mlp.fc: 64 x 160 not multiples of 64",
                      "transformer.layers.0.mlp.gate: 64 x 160 not multiples of 64",
                      "transformer.layers.0.mlp.proj: 160 x 64 not multiples of 64"]  # dense: 64 x 64 is not padded
    # widths of 128, 384 and 512 at tp 2: multiples of 128 = 64 x 2 = max(64, 64) x 2
    assert padded_layers(checkpoints["gpt2-tp2"]) == []
    assert padded_layers(checkpoints["gpt2-g64-tp2"]) == []
    # T5 at tp 2: the attention width 64 is not a multiple of 128, in both parts
    t5 = padded_layers(checkpoints["t5-tp2"])
    assert "encoder/transformer.layers.0.attention.dense: 64 x 64 not multiples of 128" in t5
    assert any(p.startswith("decoder/transformer.layers.1.") for p in t5)


def test_the_build_refuses_them_before_trtllm_build(checkpoints):
    TensorRTLLM._refuse_unloadable(checkpoints["gpt2-tp2"], variant("w8a16", 2))  # loads: nothing to refuse
    with pytest.raises(BadInput) as e:
        TensorRTLLM._refuse_unloadable(checkpoints["llama-tp1"], variant("w8a16", 1, name="fp16-w8a16-tp1"))
    msg = str(e.value)
    assert msg.startswith("variant fp16-w8a16-tp1: TensorRT-LLM declares these weight-only layers with padded widths")
    assert "transformer.layers.0.attention.qkv: 64 x 96" in msg and "(and 4 more)" in msg
    # W8A16 per group asks the installed quantizer first; here there is none to ask
    with pytest.raises(BadInput) as e:
        TensorRTLLM._refuse_unloadable(checkpoints["gpt2-w8g64-tp2"], variant("w8a16", 2, 64))
    assert "no weight_only_groupwise_quantize" in str(e.value)
