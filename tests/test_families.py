"""The decoder-only families beyond OPT and LLaMA (gpt2, gpt-neo, gpt-neox,
gptj, bloom, mistral, qwen2, and any family module added later: the lists
come from the family registry): conversion to the TensorRT-LLM layout, the
runtime decoder against Hugging Face, the tensor-parallel shard check in gloo
rank processes at tp 1, 2, 4, 8 for fp16, W8A16 and W4A16, the aoti export,
and end-to-end builds."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from enginefarm.checkpoint import convert_checkpoint, load_rank
from enginefarm.cli import main as cli
from enginefarm.errors import BadInput, NotAvailable
from enginefarm.evaluation import check_shard_sets
from enginefarm.families import decoder_families, get_family, load_recipe, tiny_fixtures
from enginefarm.runtime.decoder import DecoderConfig, DecoderLM
from enginefarm.runtime.export import export_step
from enginefarm.spec import Variant
from enginefarm.testing import write_tiny
from enginefarm.testing.tiny import eval_text

# Every registered decoder-only family but OPT and LLaMA (tests/test_convert.py,
# tests/test_build.py and the rest test those two). A family's own tiny
# checkpoint is named like it: 2 layers, 64 wide, 8 heads (so tp 1, 2, 4, 8).
FAMILIES = tuple(f for f in decoder_families() if f not in ("opt", "llama"))
# TensorRT-LLM's architecture names, as its models name them (an oracle for
# the families here when this was written; a new family is held to its own)
ARCH = {"gpt2": "GPTForCausalLM", "gpt-neo": "GPTForCausalLM", "gpt-neox": "GPTNeoXForCausalLM",
        "gptj": "GPTJForCausalLM", "bloom": "BloomForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM"}
# tiny checkpoint -> family (the variants exercise what the defaults do not)
TINY = {name: fam for name, fam in tiny_fixtures().items() if fam in FAMILIES}
# Built end to end below: every family but these, whose graphs' pieces the
# builds of OPT / LLaMA (tests/test_build.py), BLOOM and GPT-J already compile
# (learned positions, sliding windows, partial rotary, parallel residual). A
# family added later is built unless it is named here.
NOT_BUILT = ("gpt2", "gpt-neo", "gpt-neox", "mistral")
PROMPTS = ["The build farm", "Engines are rebuilt every night when"]
ROOT = Path(__file__).resolve().parent.parent


def V(tp=1, dtype="float32", quant="none", backend="aoti"):
    return Variant(name=f"{dtype}-{quant}-tp{tp}", backend=backend, dtype=dtype, quant=quant, tp=tp, target="cpu")


def norm(name, bias=True):
    return {f"{name}.weight", f"{name}.bias"} if bias else {f"{name}.weight"}


# The tensors of a rank file, per the TensorRT-LLM model of each architecture
# (tensorrt_llm/models/{gpt,gptj,bloom,llama}, examples/gptneox).
LINEAR = norm("attention.qkv") | norm("attention.dense") | norm("mlp.fc") | norm("mlp.proj")
LAYER = {
    "gpt2": norm("input_layernorm") | norm("post_layernorm") | LINEAR,
    "gpt-neo": norm("input_layernorm") | norm("post_layernorm") | LINEAR,
    "gpt-neox": norm("input_layernorm") | norm("post_attention_layernorm") | LINEAR,
    "gptj": norm("input_layernorm") | {"attention.qkv.weight", "attention.dense.weight"} | norm("mlp.fc") | norm("mlp.proj"),
    "bloom": norm("input_layernorm") | norm("post_layernorm") | LINEAR,
    "mistral": {f"{n}.weight" for n in ("input_layernorm", "post_layernorm", "attention.qkv", "attention.dense",
                                        "mlp.fc", "mlp.gate", "mlp.proj")},
}
TOP = {
    "gpt2": {"transformer.vocab_embedding.weight", "transformer.position_embedding.weight", "lm_head.weight"}
    | norm("transformer.ln_f"),
    "gpt-neo": {"transformer.vocab_embedding.weight", "transformer.position_embedding.weight", "lm_head.weight"}
    | norm("transformer.ln_f"),
    "gpt-neox": {"transformer.vocab_embedding.weight", "lm_head.weight"} | norm("transformer.ln_f"),
    "gptj": {"transformer.vocab_embedding.weight"} | norm("lm_head") | norm("transformer.ln_f"),
    "bloom": {"transformer.vocab_embedding.weight", "lm_head.weight"} | norm("transformer.ln_embed")
    | norm("transformer.ln_f"),
    "mistral": {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"},
}
CORE_LAYER = {"input_layernorm.weight", "attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight",
              "mlp.proj.weight"}
CORE_TOP = {"transformer.vocab_embedding.weight", "lm_head.weight"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Each tiny checkpoint, written once for this module (seeded)."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(name):
        if name not in made:
            made[name] = write_tiny(name, root / name, seed=3)
        return made[name]

    return get


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_layout_names_shapes_and_tp_splits(tmp_path, tiny, family):
    src = tiny(family)
    hf = json.loads((src / "config.json").read_text())
    fam = get_family(family)
    convert_checkpoint(fam, src, tmp_path / "tp1", V(1, "float16"))
    convert_checkpoint(fam, src, tmp_path / "tp2", V(2, "float16"))
    cfg = json.loads((tmp_path / "tp2" / "config.json").read_text())
    assert cfg["architecture"] == ARCH.get(family, fam.architecture)
    assert cfg["dtype"] == "float16" and cfg["mapping"]["tp_size"] == 2
    c = DecoderConfig.from_trtllm(cfg)
    assert (c.num_layers, c.num_heads, c.hidden_size, c.vocab_size) == (2, 8, 64, 384)
    L = c.num_layers
    _, w1 = load_rank(tmp_path / "tp1", 0)
    ranks = [load_rank(tmp_path / "tp2", r)[1] for r in range(2)]
    assert all(set(w) == set(w1) for w in ranks)
    if family in LAYER:
        expected = TOP[family] | {f"transformer.layers.{i}.{n}" for i in range(L) for n in LAYER[family]}
        assert set(w1) == expected
    else:  # a family added later: at least what every decoder layer has
        expected = CORE_TOP | {f"transformer.layers.{i}.{n}" for i in range(L) for n in CORE_LAYER}
        assert expected <= set(w1), expected - set(w1)
    assert all(t.dtype == torch.float16 for t in w1.values())

    h, d, kv = c.hidden_size, c.head_size, c.num_kv_heads
    inter = cfg["intermediate_size"]
    n = "transformer.layers.1."
    # per rank: q of its heads, then k and v of its kv heads; fc split on
    # the output dim, dense and proj on the input dim; the vocab on the head
    assert ranks[1][n + "attention.qkv.weight"].shape == ((h + 2 * kv * d) // 2, h)
    assert ranks[1][n + "attention.dense.weight"].shape == (h, h // 2)
    assert ranks[1][n + "mlp.fc.weight"].shape == (inter // 2, h)
    assert ranks[1][n + "mlp.proj.weight"].shape == (h, inter // 2)
    assert ranks[1]["lm_head.weight"].shape == (192, h)
    # the shards put back together are the tp 1 tensors
    q1, k1, v1 = w1[n + "attention.qkv.weight"].split([h, kv * d, kv * d])
    parts = [w[n + "attention.qkv.weight"].split([h // 2, kv * d // 2, kv * d // 2]) for w in ranks]
    for j, whole in enumerate((q1, k1, v1)):
        assert torch.equal(torch.cat([p[j] for p in parts]), whole)
    if n + "attention.qkv.bias" in w1:  # split as the weight's rows
        q1, k1, v1 = w1[n + "attention.qkv.bias"].split([h, kv * d, kv * d])
        parts = [w[n + "attention.qkv.bias"].split([h // 2, kv * d // 2, kv * d // 2]) for w in ranks]
        for j, whole in enumerate((q1, k1, v1)):
            assert torch.equal(torch.cat([p[j] for p in parts]), whole)
    for name, dim in (("attention.dense.weight", 1), ("mlp.fc.weight", 0), ("mlp.proj.weight", 1)):
        assert torch.equal(torch.cat([w[n + name] for w in ranks], dim), w1[n + name])
    assert torch.equal(torch.cat([w["lm_head.weight"] for w in ranks]), w1["lm_head.weight"])
    if family == "gptj":  # added before the one all-reduce: on rank 0 only
        assert torch.equal(ranks[0][n + "mlp.proj.bias"], w1[n + "mlp.proj.bias"])
        assert not ranks[1][n + "mlp.proj.bias"].any() and w1[n + "mlp.proj.bias"].any()
        assert torch.equal(torch.cat([w["lm_head.bias"] for w in ranks]), w1["lm_head.bias"])
    elif n + "mlp.proj.bias" in w1:  # added after the all-reduce: whole everywhere
        assert all(torch.equal(w[n + "mlp.proj.bias"], w1[n + "mlp.proj.bias"]) for w in ranks)
    if family == "gpt-neo":
        assert cfg["q_scaling"] == pytest.approx(1 / math.sqrt(d))
        assert cfg["max_attention_window_size"] == [None, hf["window_size"]]
    if family == "mistral":
        assert cfg["max_attention_window_size"] == [hf["sliding_window"]] * L
    if family == "gpt-neox":
        assert cfg["rotary_pct"] == 0.5 and cfg["use_parallel_residual"] is True
    if family == "gptj":
        assert cfg["rotary_dim"] == hf["rotary_dim"] == d // 2 and cfg["position_embedding_type"] == "rope_gptj"
    if family == "bloom":
        assert cfg["position_embedding_type"] == "alibi"
    if family == "qwen2":  # TensorRT-LLM's QWen model: q/k/v biases, none on the attention output
        assert cfg["qwen_type"] == "qwen2" and cfg["attn_bias"] is True
        assert w1[n + "attention.qkv.bias"].any() and n + "attention.dense.bias" not in w1


def test_interleaved_qkv_is_reordered_per_head(tmp_path, tiny):
    """GPT-NeoX's query_key_value rows are [q0; k0; v0; q1; ...]; the
    checkpoint's are [q; k; v]: q head 1 is HF rows 3d..4d."""
    src = tiny("gpt-neox")
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        fused = f.get_tensor("gpt_neox.layers.0.attention.query_key_value.weight")
    convert_checkpoint(get_family("gpt-neox"), src, tmp_path / "c", V())
    _, w = load_rank(tmp_path / "c", 0)
    qkv = w["transformer.layers.0.attention.qkv.weight"]
    d = 8
    assert torch.equal(qkv[d : 2 * d], fused[3 * d : 4 * d])  # q of head 1
    assert torch.equal(qkv[64 : 64 + d], fused[d : 2 * d])  # k of head 0
    assert torch.equal(qkv[128 + d : 128 + 2 * d], fused[5 * d : 6 * d])  # v of head 1


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_original_unprefixed_tensor_names_convert_the_same(tmp_path, tiny, family):
    """openai-community/gpt2's and bigscience/bloom*'s files were saved from
    the base model: tensor names without 'transformer.'."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, old = tiny(family), tmp_path / "old"
    shutil.copytree(src, old)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys() if k != "lm_head.weight"}
    assert all(not k.startswith("transformer.") for k in tensors)
    save_file(tensors, str(old / "model.safetensors"), metadata={"format": "pt"})
    fam = get_family(family)
    convert_checkpoint(fam, src, tmp_path / "a", V(2, "float16"))
    convert_checkpoint(fam, old, tmp_path / "b", V(2, "float16"))
    for r in range(2):
        _, a = load_rank(tmp_path / "a", r)
        _, b = load_rank(tmp_path / "b", r)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt_neox_legacy_rotary_config_keys(tmp_path, tiny):
    """Pythia's config.json says rotary_pct / rotary_emb_base; newer
    transformers writes rope_parameters: both give the same checkpoint."""
    src, old = tiny("gpt-neox"), tmp_path / "old"
    shutil.copytree(src, old)
    cfg = json.loads((old / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (old / "config.json").write_text(json.dumps(cfg))
    convert_checkpoint(get_family("gpt-neox"), src, tmp_path / "a", V())
    convert_checkpoint(get_family("gpt-neox"), old, tmp_path / "b", V())
    a = json.loads((tmp_path / "a" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert a == b and (a["rotary_pct"], a["rotary_emb_base"]) == (0.5, 10000.0)


# ----------------------------------------------------------------------------- runtime vs Hugging Face


@pytest.mark.parametrize("name", sorted(TINY))
def test_runtime_matches_hf_prefill_and_decode(tmp_path, tiny, name):
    """fp32, tp 1: 30 prompt tokens (past the 16-token attention windows of
    gpt-neo and mistral), then decode steps through the KV cache."""
    from transformers import AutoModelForCausalLM

    src = tiny(name)
    convert_checkpoint(get_family(TINY[name]), src, tmp_path / "c", V())
    model = DecoderLM.from_checkpoint(tmp_path / "c")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(4, 384, (1, 30), generator=torch.Generator().manual_seed(1))
    kc, vc = model.new_cache(1, 64)
    with torch.no_grad():
        lg, kc, vc = model(ids, torch.tensor([0]), kc, vc)
        assert (lg - hf(ids).logits).abs().max() < 1e-4
        seq = ids
        for step in range(3):
            nxt = lg[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            lg, kc, vc = model(nxt, torch.tensor([seq.shape[1] - 1]), kc, vc)
            assert (lg[:, 0] - hf(seq).logits[:, -1]).abs().max() < 1e-4
        if name in ("gpt-neo", "mistral"):  # the windows are what makes it agree
            _, W = load_rank(tmp_path / "c", 0)
            unwindowed = DecoderLM(dataclasses.replace(model.cfg, windows=()), W).eval()
            lg0, _, _ = unwindowed(ids, torch.tensor([0]), *unwindowed.new_cache(1, 64))
            assert (lg0 - hf(ids).logits).abs().max() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_aoti_export_with_dynamic_batch_and_tokens(tmp_path, tiny, family):
    """The graph the aoti backend compiles: exported once, it runs other
    batch sizes and token counts and equals the eager decoder."""
    convert_checkpoint(get_family(family), tiny(family), tmp_path / "c", V())
    model = DecoderLM.from_checkpoint(tmp_path / "c")
    ep = export_step(model, 2, 32, 64).module()
    ids = torch.randint(4, 384, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        kc, vc = model.new_cache(2, 64)
        got = ep(ids, torch.tensor([0]), list(kc.unbind(0)), list(vc.unbind(0)))  # writes kc, vc in place
        want, wk, wv = model(ids, torch.tensor([0]), *model.new_cache(2, 64))
        assert (got - want).abs().max() < 1e-5 and torch.allclose(kc, wk, atol=1e-5)
        one = ids[:1, :1]
        k1, v1 = kc[:, :1].clone(), vc[:, :1].clone()
        got = ep(one, torch.tensor([20]), list(k1.unbind(0)), list(v1.unbind(0)))
        want, _, _ = model(one, torch.tensor([20]), wk[:, :1].clone(), wv[:, :1].clone())
        assert (got - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------- tensor-parallel shard check

# Judged against Hugging Face in fp32 (fp16) and against the fp16 tp 1
# checkpoint (quantized); the measured worst cases over these six tiny
# random models are in the closing note of this change.
GATES = {
    "none": {"diff": 0.01, "top1": 0.98, "ppl": 0.002},
    "w8a16": {"diff": 0.12, "top1": 0.95, "ppl": 0.01},
    "w4a16": {"diff": 2.5, "top1": 0.5, "ppl": 0.07},
}


def test_gloo_shard_check_every_family_tp_1_2_4_8_fp16_w8a16_w4a16(tmp_path, tiny):
    sets = []
    for family in FAMILIES:
        src = tiny(family)
        fam = get_family(family)
        base = tmp_path / family / "base"
        convert_checkpoint(fam, src, base, V(1, "float16", backend="tensorrt-llm"))
        dirs = []
        for tp in (1, 2, 4, 8):
            for quant in GATES:
                d = tmp_path / family / f"tp{tp}-{quant}"
                convert_checkpoint(fam, src, d, V(tp, "float16", quant, backend="tensorrt-llm"))
                dirs.append(d)
        sets.append((src, dirs, base))
    results = check_shard_sets(sets, PROMPTS, eval_text(), max_eval_tokens=128)
    failures, rows = [], []
    for family, rs in zip(FAMILIES, results):
        assert len(rs) == 12
        for r in rs:
            quant = r["checkpoint"].rsplit("-", 1)[1]
            g = GATES[quant]
            # fp16 against Hugging Face fp32; quantized against fp16 tp 1
            m = r if quant == "none" else r["vs_baseline"]
            row = (f"{family} tp{r['tp']} {quant}: diff {m['logits_max_abs_diff']:.4f} top1 {m['top1_agreement']:.3f} "
                   f"ppl {r['perplexity']['engine']:.2f} vs {r['perplexity']['reference']:.2f} "
                   f"(tp1 fp16: diff {r['vs_baseline']['logits_max_abs_diff']:.4f})")
            ok = (m["logits_max_abs_diff"] < g["diff"] and m["top1_agreement"] >= g["top1"]
                  and r["perplexity_rel_diff"] < g["ppl"] and r["eval_tokens"] > 100)
            # fp16: every tp size gives the tp 1 numbers, to fp16 rounding (greedy
            # tokens are not gated: fp16 rounding may flip a near tie, as top-1 shows)
            if quant == "none" and r["vs_baseline"]["logits_max_abs_diff"] >= g["diff"]:
                ok = False
            rows.append(row + " greedy " + ("equal" if r["greedy_equal"] else "differs"))
            if not ok:
                failures.append(row)
    print("\n".join(rows))  # the figures, with pytest -s
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- builds end to end


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NOT_BUILT])
def test_build_of_tiny_recipe_validates(tmp_path, tiny, capsys, family):
    """enginefarm build: convert, aoti engine, validation against Hugging
    Face (fp32: logits to 1e-3, greedy tokens equal), publish. BLOOM (ALiBi
    masks, embedding norm) and GPT-J (interleaved partial rotary, parallel
    residual, LM head bias) are the graphs furthest from OPT and LLaMA;
    Qwen2 (q/k/v biases) came as one module and its recipe."""
    import yaml

    data = yaml.safe_load((ROOT / "models" / "tiny" / f"{get_family(family).tiny_recipe}.yaml").read_text())
    data["source"] = {"path": str(tiny(family))}
    recipe = tmp_path / f"tiny-{family}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert cli(["build", str(recipe), "--store", str(tmp_path / "store"), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)["variants"]["fp32-tp1"]
    assert v["validation"] is True and "llm/llm.pt2" in v["files"]
    assert v["gates"]["greedy_equal"]["passed"] and v["gates"]["logits_max_abs_diff"]["value"] < 1e-3


# ----------------------------------------------------------------------------- refusals


def test_tp_not_dividing_heads_is_refused(tmp_path, tiny):
    with pytest.raises(BadInput, match="tp size 4 does not divide the model's 6 attention heads"):
        convert_checkpoint(get_family("bloom"), tiny("bloom-h6"), tmp_path / "o", V(4))


def test_what_tensorrt_llm_does_not_compute_is_refused_for_it_only(tmp_path, tiny):
    src = tiny("gpt-neox-seq")  # use_parallel_residual: false
    fam = get_family("gpt-neox")
    with pytest.raises(NotAvailable, match="sequential residual .* build it with the aoti backend"):
        convert_checkpoint(fam, src, tmp_path / "trt", V(1, "float16", backend="tensorrt-llm"))
    convert_checkpoint(fam, src, tmp_path / "aoti", V(1, "float16"))  # the aoti runtime computes it


@pytest.mark.parametrize("family,key,value,message", [
    ("gpt2", "scale_attn_by_inverse_layer_idx", True, "per-layer attention scale"),
    ("bloom", "apply_residual_connection_post_layernorm", True, "residual taken after the layernorm"),
    ("gpt-neo", "attention_layers", ["global", "sparse"], "do not name 'global' or 'local'"),
    ("mistral", "model_type", "llama", "model_type in \\['mistral'\\]"),
])
def test_unsupported_configs_exit_2_with_one_message(tmp_path, tiny, capsys, family, key, value, message):
    src = tmp_path / "src"
    shutil.copytree(tiny(family), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    assert cli(["convert", str(src), "--family", family, "--tp", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_rank_of_a_tp_checkpoint_reaches_the_model(tmp_path, tiny):
    """from_checkpoint(rank=r) builds rank r's model: its config says r and,
    with ALiBi, it holds the slopes of r's heads (the GPU engine form's copy
    of the decoder dropped the rank, so every rank took rank 0's slopes)."""
    from enginefarm.runtime.decoder import alibi_slopes

    convert_checkpoint(get_family("bloom"), tiny("bloom"), tmp_path / "c", V(2))
    m0 = DecoderLM.from_checkpoint(tmp_path / "c", rank=0, allow_tp=True)
    m1 = DecoderLM.from_checkpoint(tmp_path / "c", rank=1, allow_tp=True)
    h = m1.cfg.heads_per_rank
    assert (m0.cfg.tp_rank, m1.cfg.tp_rank) == (0, 1) and h == m1.cfg.num_heads // 2
    assert torch.equal(m1.alibi, alibi_slopes(m1.cfg.num_heads)[h:2 * h])
    assert not torch.equal(m0.alibi, m1.alibi)


def test_prompt_rows_past_the_table_are_clamped_into_it(tmp_path, tiny):
    """An id past the prompt table reads its last row, in eager and in the
    exported graph alike (no read outside the table: the GPU engine form's
    copy of the decoder clamped only below)."""
    convert_checkpoint(get_family("gpt2"), tiny("gpt2"), tmp_path / "c", V())
    model = DecoderLM.from_checkpoint(tmp_path / "c")
    Vs, H = model.cfg.vocab_size, model.cfg.hidden_size
    table = torch.randn(3, H, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[7, Vs, Vs + 2, Vs + 9]])
    x = model.embed_tokens(ids, table)
    assert torch.equal(x[0, 1], table[0]) and torch.equal(x[0, 2], table[2]) and torch.equal(x[0, 3], table[2])
    assert torch.equal(x[0, 0], model.embed[7])
    with torch.no_grad():
        ep = export_step(model, 1, 8, 16, prompt_rows=3).module()
        kc, vc = model.new_cache(1, 16)
        got = ep(ids, torch.tensor([0]), list(kc.unbind(0)), list(vc.unbind(0)), table)
        want, _, _ = model(ids, torch.tensor([0]), *model.new_cache(1, 16), table)
    assert torch.isfinite(got).all() and (got - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("family", decoder_families())
def test_a_decoder_family_module_declares_all_the_farm_needs(family):
    """Each decoder-only family module holds its architecture and traits, a
    tiny checkpoint named like it, and a tiny recipe that loads and names
    both; nothing else lists it."""
    from enginefarm.families import decoder_traits
    from enginefarm.testing import tiny_models

    fam = get_family(family)
    assert fam.name == family and fam.architecture and fam.model_types
    assert decoder_traits(fam.architecture) == fam.traits
    assert family in fam.tiny_models and tiny_fixtures()[family] == family and family in tiny_models()
    recipe = load_recipe(fam.tiny_recipe)
    assert recipe.family == family and recipe.source.tiny in fam.tiny_models


def test_one_name_registered_by_two_classes_is_refused():
    from enginefarm.families import register_family
    from enginefarm.families.base import DecoderFamily

    with pytest.raises(RuntimeError, match="family 'gptj' is registered twice"):
        @register_family("gptj")
        class Other(DecoderFamily):
            pass
    assert type(get_family("gptj")).__name__ == "GPTJ"


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="does not know architecture NopeForCausalLM .*Qwen2ForCausalLM"):
        DecoderConfig.from_trtllm({"architecture": "NopeForCausalLM", "position_embedding_type": "rope_gpt_neox"})


NEW_FAMILY = '''
"""A family that exists only in this test: LLaMA's conversion under an
architecture name no other module knows."""
from .base import DecoderTraits, register_family
from .llama import LLaMA


@register_family("llama-lookalike")
class LlamaLookalike(LLaMA):
    title = "a LLaMA lookalike"
    architecture = "LookalikeForCausalLM"
    traits = DecoderTraits(norm="rmsnorm", gated_mlp=True)
    tiny_random_affine = True
    tiny_models = {"llama-lookalike": dict(layers=2, hidden=32, heads=4, kv_heads=2, tied=False)}
'''

PROBE = '''
import json, sys, torch
from enginefarm.checkpoint import convert_checkpoint
from enginefarm.families import decoder_families, detect_family, get_family
from enginefarm.runtime.decoder import DecoderLM
from enginefarm.spec import Variant
from enginefarm.testing import tiny_models, write_tiny
from transformers import AutoModelForCausalLM

out = sys.argv[1]
src = write_tiny("llama-lookalike", out + "/src", seed=5)
fam = get_family("llama-lookalike")
convert_checkpoint(fam, src, out + "/c", Variant(name="v", backend="aoti", dtype="float32", quant="none", tp=1,
                                                 target="cpu"))
model = DecoderLM.from_checkpoint(out + "/c")
hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
ids = torch.randint(4, 384, (1, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    diff = (model(ids, torch.tensor([0]), *model.new_cache(1, 32))[0] - hf(ids).logits).abs().max().item()
print(json.dumps({"families": decoder_families(), "tiny": "llama-lookalike" in tiny_models(),
                  "architecture": json.load(open(out + "/c/config.json"))["architecture"],
                  "norm": model.cfg.norm, "gated": model.cfg.gated_mlp, "diff": diff}))
'''


def test_a_family_module_dropped_into_the_package_is_picked_up_everywhere(tmp_path):
    """One new module in a copy of the families package, and nothing else
    edited: the registry lists it, enginefarm.testing writes its tiny
    checkpoint, the converter writes its architecture, and the runtime's
    decoder takes that architecture's traits from it and agrees with
    Hugging Face."""
    import os
    import subprocess
    import sys

    shutil.copytree(ROOT / "enginefarm", tmp_path / "pkg" / "enginefarm", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pkg" / "enginefarm" / "families" / "llama_lookalike.py").write_text(NEW_FAMILY)
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "llama-lookalike" in got["families"] and got["tiny"]
    assert got["architecture"] == "LookalikeForCausalLM" and (got["norm"], got["gated"]) == ("rmsnorm", True)
    assert got["diff"] < 1e-4
    # and the package itself is untouched: the lookalike lives in the copy only
    assert "llama-lookalike" not in decoder_families()
