"""Encoder-decoder LLMs (T5 / Flan-T5, BART / mBART): conversion into
TensorRT-LLM's encoder/ + decoder/ checkpoints, the PyTorch encoder and
decoder step that run them (eager, in tp processes, and as aoti packages)
against Hugging Face, and the build flow end to end."""

import json

import pytest
import torch
from safetensors import safe_open

from enginefarm.checkpoint import convert_checkpoint, load_rank
from enginefarm.errors import BadInput
from enginefarm.families import get_family
from enginefarm.quant import dequantize
from enginefarm.runtime.encdec import EncDecEngine, load_encdec, relative_buckets
from enginefarm.spec import Variant
from enginefarm.testing import write_tiny

FAMILY = {"t5": "t5", "flan-t5": "t5", "bart": "bart", "mbart": "bart"}
PROMPTS = ["The build farm", "Engines are rebuilt every night when"]


def V(tp=1, quant="none", dtype="float32"):
    return Variant(name=f"x-tp{tp}", backend="aoti", dtype=dtype, quant=quant, tp=tp, target="cpu")


def hf_model(src):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(src, dtype=torch.float32).eval()


def hf_greedy(hf, ids: list[int], n: int, eos: int) -> list[int]:
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=eos,
                          decoder_start_token_id=hf.config.decoder_start_token_id, pad_token_id=hf.config.pad_token_id)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), generation_config=gc)
    return out[0, 1:].tolist()  # without the decoder start token


def keys(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ----------------------------------------------------------------------------- conversion


def test_t5_checkpoint_layout(tmp_path):
    src = write_tiny("flan-t5", tmp_path / "src", seed=2)  # 6 heads of 16 (96 != d_model 64), gated GELU, untied
    hf = json.loads((src / "config.json").read_text())
    convert_checkpoint(get_family("t5"), src, tmp_path / "ck", V(tp=2))
    enc = json.loads((tmp_path / "ck" / "encoder" / "config.json").read_text())
    dec = json.loads((tmp_path / "ck" / "decoder" / "config.json").read_text())
    assert not (tmp_path / "ck" / "config.json").exists()
    assert (enc["architecture"], dec["architecture"]) == ("EncoderModel", "DecoderModel")
    for c in (enc, dec):
        assert c["relative_attention"] is True and c["has_position_embedding"] is False
        assert (c["num_buckets"], c["max_distance"]) == (8, 20)
        assert c["mlp_type"] == 1 and c["layernorm_type"] == 1 and c["head_size"] == 16
        assert abs(c["q_scaling"] - 0.25) < 1e-12  # 1/sqrt(16): cancels TensorRT-LLM's scale
        assert c["mapping"]["tp_size"] == 2
    assert dec["rescale_before_lm_head"] is False  # untied, like Flan-T5
    assert (dec["encoder_hidden_size"], dec["encoder_num_heads"], dec["decoder_start_token_id"]) == (64, 6, 1)

    e1, d1 = keys(tmp_path / "ck" / "encoder" / "rank1.safetensors"), keys(tmp_path / "ck" / "decoder" / "rank1.safetensors")
    hd, ff = 3 * 16, hf["d_ff"] // 2  # per rank
    assert e1["transformer.layers.1.attention.qkv.weight"] == (3 * hd, 64)
    assert e1["transformer.layers.1.attention.dense.weight"] == (64, hd)
    assert e1["transformer.layers.1.attention.rel_attn_table"] == (3, 8)
    assert e1["transformer.layers.0.mlp.gate.weight"] == (ff, 64) and e1["transformer.layers.0.mlp.proj.weight"] == (64, ff)
    assert "transformer.ln_f.weight" in e1 and "lm_head.weight" not in e1
    assert d1["transformer.layers.0.cross_attention.qkv.weight"] == (3 * hd, 64)
    assert d1["transformer.layers.0.cross_attention.dense.weight"] == (64, hd)
    assert d1["rel_attn_table"] == (3, 8) and d1["lm_head.weight"] == (192, 64)
    assert {k for k in d1 if ".layers.0." in k} == {
        f"transformer.layers.0.{n}" for n in (
            "self_attention.qkv.weight", "self_attention.dense.weight", "self_attention.rel_attn_table",
            "self_attention_layernorm.weight", "cross_attention.qkv.weight", "cross_attention.dense.weight",
            "cross_attention_layernorm.weight", "mlp.fc.weight", "mlp.gate.weight", "mlp.proj.weight",
            "mlp_layernorm.weight")}

    # the shards reassemble to the tp 1 tensors: fused q/k/v per rank, relative tables by head
    convert_checkpoint(get_family("t5"), src, tmp_path / "tp1", V(tp=1))
    _, w = load_rank(tmp_path / "tp1" / "decoder", 0)
    _, a = load_rank(tmp_path / "ck" / "decoder", 0)
    _, b = load_rank(tmp_path / "ck" / "decoder", 1)
    n = "transformer.layers.1.cross_attention.qkv.weight"
    for part in range(3):
        whole = w[n][part * 96 : (part + 1) * 96]
        assert torch.equal(torch.cat([a[n][part * 48 : (part + 1) * 48], b[n][part * 48 : (part + 1) * 48]]), whole)
    assert torch.equal(torch.cat([a["rel_attn_table"], b["rel_attn_table"]]), w["rel_attn_table"])
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        table = f.get_tensor("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        assert torch.equal(w["transformer.layers.1.self_attention.rel_attn_table"], table.t())
        assert torch.equal(w["lm_head.weight"], f.get_tensor("lm_head.weight"))


def test_bart_and_mbart_checkpoint_layout(tmp_path):
    for name, pre in (("bart", False), ("mbart", True)):
        src = write_tiny(name, tmp_path / name, seed=2)
        ck = tmp_path / f"ck-{name}"
        convert_checkpoint(get_family("bart"), src, ck, V(tp=4))
        for side in ("encoder", "decoder"):
            c = json.loads((ck / side / "config.json").read_text())
            assert c["has_position_embedding"] and c["has_embedding_layernorm"] and not c["relative_attention"]
            assert c["layernorm_position"] == (0 if pre else 1) and c["has_model_final_layernorm"] is pre
            assert c["has_embedding_scale"] is pre and c["q_scaling"] == 1.0 and c["max_position_embeddings"] == 256
            k = keys(ck / side / "rank3.safetensors")
            attn = "attention" if side == "encoder" else "self_attention"
            assert k[f"transformer.layers.1.{attn}.qkv.bias"] == (48,)  # 3 x 64 / 4
            assert k[f"transformer.layers.1.{attn}.dense.bias"] == (64,)  # row-parallel bias: whole on every rank
            assert k["transformer.position_embedding.weight"] == (256, 64)
            assert ("transformer.ln_f.weight" in k) is pre
        _, w = load_rank(ck / "decoder", 2)
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            assert torch.equal(w["transformer.position_embedding.weight"], f.get_tensor("model.decoder.embed_positions.weight")[2:])
            assert torch.equal(w["lm_head.weight"], f.get_tensor("model.shared.weight")[192:288])  # tied: from the shared table
            assert torch.equal(w["lm_head.bias"], f.get_tensor("final_logits_bias")[0, 192:288])


def test_weight_only_quantization_covers_cross_attention(tmp_path):
    src = write_tiny("bart", tmp_path / "src", seed=4)
    convert_checkpoint(get_family("bart"), src, tmp_path / "q", V(tp=2, quant="w8a16"))
    cfg, w = load_rank(tmp_path / "q" / "decoder", 1)
    assert cfg["quantization"]["quant_algo"] == "W8A16"
    n = "transformer.layers.0.cross_attention."
    assert w[n + "qkv.weight"].dtype == torch.int8 and w[n + "dense.weight"].dtype == torch.int8
    assert w["transformer.layers.0.cross_attention_layernorm.weight"].dtype == torch.float32
    assert w["lm_head.weight"].dtype == torch.float32 and w["transformer.vocab_embedding.weight"].dtype == torch.float32
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        k = f.get_tensor("model.decoder.layers.0.encoder_attn.k_proj.weight")[32:]  # rank 1's heads
    deq = dequantize(w[n + "qkv.weight"], w[n + "qkv.per_channel_scale"], 8)
    err = (deq[32:64] - k).abs().max() / k.abs().max()
    assert 0 < err < 1 / 127


def test_tp_not_dividing_heads_is_refused(tmp_path):
    src = write_tiny("flan-t5", tmp_path / "src")  # 6 heads
    with pytest.raises(BadInput, match="tp size 4 does not divide the model's 6 encoder attention heads"):
        convert_checkpoint(get_family("t5"), src, tmp_path / "o", V(tp=4))
    assert not (tmp_path / "o").exists()


def test_relative_buckets_are_t5s():
    from transformers.models.t5.modeling_t5 import T5Attention

    pos = torch.arange(300)
    rel = pos[None, :] - pos[:, None]
    for bidirectional in (True, False):
        for buckets, dist in ((8, 20), (32, 128)):
            ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets,
                                                        max_distance=dist)
            assert torch.equal(relative_buckets(rel, bidirectional, buckets, dist), ref)


# ----------------------------------------------------------------------------- runtime against Hugging Face


@pytest.mark.parametrize("name", ["t5", "flan-t5", "bart", "mbart"])
def test_encoder_and_decoder_step_match_hf(tmp_path, name):
    src = write_tiny(name, tmp_path / "src", seed=7)
    convert_checkpoint(get_family(FAMILY[name]), src, tmp_path / "ck", V())
    encoder, decoder = load_encdec(tmp_path / "ck")
    eng = EncDecEngine.from_modules(encoder, decoder, {"max_batch_size": 3, "max_input_len": 32, "max_seq_len": 40})
    hf = hf_model(src)
    start = hf.config.decoder_start_token_id
    assert eng.decoder_start_token_id == start
    ids = [5, 17, 42, 99, 3, 250, 11, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 60, 61, 62, 63, 64, 65]
    dec = [start, 77, 12, 150, 9, 301]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([dec]))
        ck, cv, lengths = eng.encode([ids])
        enc_out, _, _ = encoder(torch.tensor([ids]), lengths)
        assert (enc_out - out.encoder_last_hidden_state).abs().max() < 1e-4
        # prefill of 4 tokens, then one token at a time through the static cache
        kc, vc = eng.new_cache(1)
        lg, kc, vc = eng.step(torch.tensor([dec[:4]]), 0, kc, vc, ck, cv, lengths)
        steps = [lg[0]]
        for p in range(4, len(dec)):
            lg, kc, vc = eng.step(torch.tensor([[dec[p]]]), p, kc, vc, ck, cv, lengths)
            steps.append(lg[0])
    assert (torch.cat(steps) - out.logits[0]).abs().max() < 1e-4
    # greedy, three prompts of different lengths in one (padded) batch
    prompts = [ids[:7], ids[:2], ids]
    got = eng.generate(prompts, 16)  # no end token: 16 each, every one HF's argmax after the ones before
    for p, g in zip(prompts, got):
        with torch.no_grad():
            lg = hf(input_ids=torch.tensor([p]), decoder_input_ids=torch.tensor([[start] + g[:-1]])).logits[0]
        assert lg.argmax(-1).tolist() == g
    assert len({t for g in got for t in g}) > 3  # the fixtures do not just repeat one token
    # stopping at </s>: the tokens up to and including it, as HF generate
    got = eng.generate(prompts, 16, eos_token_id=2)
    assert got == [hf_greedy(hf, p, 16, 2) for p in prompts]


def test_generation_limits_are_bad_input(tmp_path):
    src = write_tiny("bart", tmp_path / "src", seed=1)
    convert_checkpoint(get_family("bart"), src, tmp_path / "ck", V())
    eng = EncDecEngine.from_modules(*load_encdec(tmp_path / "ck"), {"max_batch_size": 2, "max_input_len": 8, "max_seq_len": 12})
    with pytest.raises(BadInput, match="max_input_len 8"):
        eng.generate([list(range(5, 15))], 4)
    with pytest.raises(BadInput, match="max_batch_size 2"):
        eng.generate([[5], [6], [7]], 4)
    with pytest.raises(BadInput, match="13 new tokens exceed the decoder's max_seq_len 12"):
        eng.generate([[5, 6]], 13)
    with pytest.raises(BadInput, match="empty prompt"):
        eng.generate([[]], 3)


# ----------------------------------------------------------------------------- tp shards (gloo processes)


def test_gloo_shard_check_every_family_tp_1_2_4_8_fp16_w8a16_w4a16(tmp_path):
    """T5, Flan-T5 (gated GELU), BART and mBART, each at tp 1, 2, 4 and 8 in
    fp16, W8A16 and W4A16 (per channel), in gloo tp processes: fp16 against
    Hugging Face fp32, the quantized checkpoints against the fp16 tp 1 one.
    W8A16 is judged by the recipe's default gate (spec.DEFAULT_QUANT_GATES).
    W4A16 per channel on these tiny random models sits at the default gate's
    edge (Flan-T5's gated GELU: top-1 0.39-0.50 over tp 1/2/4/8 with
    TensorRT-LLM's int4 quantizer, whose max|w|/8 scale clamps each channel's
    largest weight to 7; 0.46-0.57 with the farm's former max|w|/7; a real
    checkpoint is far less sensitive, and a recipe can ask for per-group
    scales), so it is held to a stated, looser bound here: top-1 >= 0.35,
    perplexity within 8%. The figures: pytest -s."""
    from enginefarm.evaluation import check_shard_sets
    from enginefarm.spec import DEFAULT_QUANT_GATES
    from enginefarm.testing.tiny import eval_text

    sets = []
    for name in FAMILY:
        src = write_tiny(name, tmp_path / name / "src", seed=3, heads=8)
        fam = get_family(FAMILY[name])
        base = tmp_path / name / "base"
        convert_checkpoint(fam, src, base, V(dtype="float16"))
        dirs = []
        for tp in (1, 2, 4, 8):
            for quant in ("none", "w8a16", "w4a16"):
                d = tmp_path / name / f"tp{tp}-{quant}"
                convert_checkpoint(fam, src, d, V(tp, quant, "float16"))
                dirs.append(d)
        sets.append((src, dirs, base))
    results = check_shard_sets(sets, PROMPTS, eval_text(), max_new_tokens=8, max_eval_tokens=128)
    rows, failures = [], []
    for name, rs in zip(FAMILY, results):
        assert len(rs) == 12
        for r in rs:
            quant = r["checkpoint"].rsplit("-", 1)[1]
            assert r["eval_tokens"] >= 120
            m = r if quant == "none" else r["vs_baseline"]
            row = (f"{name} tp{r['tp']} {quant}: diff {m['logits_max_abs_diff']:.4f} top1 {m['top1_agreement']:.3f} "
                   f"ppl {r['perplexity']['engine']:.2f} vs {r['perplexity']['reference']:.2f}")
            rows.append(row)
            if quant == "none":
                # fp16 shards: Hugging Face's numbers to fp16 rounding, at every tp size
                ok = (m["logits_max_abs_diff"] < 0.02 and m["top1_agreement"] >= 0.97
                      and r["perplexity_rel_diff"] < 0.002)
            else:
                g = DEFAULT_QUANT_GATES[quant]
                top1, ppl = (g.top1_agreement, g.perplexity_rel_diff) if quant == "w8a16" else (0.35, 0.08)
                ok = m["top1_agreement"] >= top1 and r["perplexity_rel_diff"] <= ppl and 0 < m["logits_max_abs_diff"]
            if not ok:
                failures.append(row)
    print("\n".join(rows))
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- the build flow


def test_t5_build_validates_and_runs_from_the_store(tmp_path, capsys):
    from transformers import AutoTokenizer

    from enginefarm.cli import main as cli
    from enginefarm.flows.build import build
    from test_build import recipe_for

    src = write_tiny("flan-t5", tmp_path / "src", seed=5)
    store = str(tmp_path / "store")
    out = build(recipe=str(recipe_for(tmp_path, "t5-e2e", "t5", src)), store=store)
    v = out["variants"]["fp32-tp1"]
    assert v["validation"] is True and all(g["passed"] for g in v["gates"].values())
    assert {"llm/encoder.pt2", "llm/decoder.pt2", "llm/engine.json"} <= set(v["files"])
    # an encoder-decoder text recipe's validate reads the reference step's outputs, as a decoder-only one's
    from enginefarm.store import open_store

    st = open_store(store)
    ((_, _, ref_key),) = st.list_manifests("t5-e2e", "reference")
    ((_, _, val_key),) = st.list_manifests("t5-e2e", "validate")
    assert st.get_manifest("t5-e2e", "validate", val_key)["inputs"]["reference"]["key"] == ref_key

    tok = AutoTokenizer.from_pretrained(src)
    hf = hf_model(src)
    capsys.readouterr()
    assert cli(["run", "t5-e2e:fp32-tp1", "--store", store, "--max-new-tokens", "10", "--json"]
               + sum([["--prompt", p] for p in PROMPTS], [])) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    for p, r in zip(PROMPTS, got):
        assert r["output_ids"] == hf_greedy(hf, tok(p).input_ids, 10, tok.eos_token_id)
    assert cli(["run", "t5-e2e:fp32-tp1", "--store", store, "--prompt", " ".join(["engine"] * 200)]) == 2
    assert "max_input_len 32" in capsys.readouterr().err
    assert cli(["run", "t5-e2e:fp32-tp1", "--store", store, "--prompt", "a", "--max-new-tokens", "100"]) == 2
    assert "max_seq_len 64" in capsys.readouterr().err


def test_bart_build_from_the_cli(tmp_path, capsys):
    from enginefarm.cli import main as cli
    from test_build import recipe_for

    src = write_tiny("bart", tmp_path / "src", seed=6)
    recipe = recipe_for(tmp_path, "bart-e2e", "bart", src)
    assert cli(["build", str(recipe), "--store", str(tmp_path / "store"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    v = out["variants"]["fp32-tp1"]
    assert v["validation"] is True
    assert v["gates"]["greedy_equal"]["value"] is True
    assert v["gates"]["logits_max_abs_diff"]["value"] < 1e-4


# ----------------------------------------------------------------------------- real model configs (no weights)

# config.json values of public checkpoints (the fields that matter here)
REAL_CONFIGS = {
    "google/flan-t5-small": dict(model_type="t5", d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8,
                                 num_decoder_layers=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                 vocab_size=32128, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
    "t5-small": dict(model_type="t5", d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6, vocab_size=32128,
                     decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
    "facebook/bart-large": dict(model_type="bart", d_model=1024, encoder_layers=12, decoder_layers=12,
                                encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                                decoder_ffn_dim=4096, max_position_embeddings=1024, scale_embedding=False,
                                activation_function="gelu", vocab_size=50265, decoder_start_token_id=2),
    "facebook/mbart-large-50": dict(model_type="mbart", d_model=1024, encoder_layers=12, decoder_layers=12,
                                    encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                                    decoder_ffn_dim=4096, max_position_embeddings=1024, scale_embedding=True,
                                    activation_function="gelu", vocab_size=250054, decoder_start_token_id=2),
}


@pytest.mark.parametrize("repo", sorted(REAL_CONFIGS))
def test_real_configs_convert_every_tensor(repo):
    """The converter against the full-size architectures of public
    checkpoints, on the meta device (shapes only): every output tensor can be
    made from tensors the model has, with TensorRT-LLM's shapes, and every
    tensor of the model is used (but aliases of the shared embedding)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    hf = REAL_CONFIGS[repo]
    cfg = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    fam = get_family(FAMILY["t5" if hf["model_type"] == "t5" else "bart"])
    heads = hf.get("num_heads") or hf["encoder_attention_heads"]
    for tp in (1, 2, 4, 8):
        if heads % tp:
            with pytest.raises(BadInput, match=f"tp size {tp} does not divide the model's {heads} encoder"):
                fam.check_config(hf, V(tp=tp))
            continue
        fam.check_config(hf, V(tp=tp))
        used = set()
        for part in fam.checkpoint_parts(hf, set(shapes), V(tp=tp)):
            c = part.config
            for o in part.tensors(tp - 1):
                used.update(o.sources)
                t = o.make(*(torch.empty(shapes[s], device="meta") for s in o.sources))
                if o.name.endswith("qkv.weight"):
                    assert tuple(t.shape) == (3 * c["num_attention_heads"] * c["head_size"] // tp, c["hidden_size"])
                if o.name.endswith("rel_attn_table"):
                    assert tuple(t.shape) == (heads // tp, c["num_buckets"])
                if o.name == "lm_head.weight":
                    assert t.shape[0] * tp >= hf["vocab_size"] > (t.shape[0] - 1) * tp
        aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "model.encoder.embed_tokens.weight",
                   "model.decoder.embed_tokens.weight", "model.shared.weight", "shared.weight"}
        assert set(shapes) - used <= aliases, sorted(set(shapes) - used)
    enc, dec = (p.config for p in fam.checkpoint_parts(hf, set(shapes), V()))
    if hf["model_type"] == "t5":
        flan = hf.get("feed_forward_proj") == "gated-gelu"
        assert dec["rescale_before_lm_head"] is not flan  # T5 scales (tied), Flan-T5 does not
        assert (enc["hidden_act"], enc["mlp_type"]) == (("gelu_new", 1) if flan else ("relu", 0))
        assert enc["q_scaling"] == 1 / 8
    else:
        mbart = hf["model_type"] == "mbart"
        assert enc["layernorm_position"] == dec["layernorm_position"] == (0 if mbart else 1)
        assert enc["has_model_final_layernorm"] is dec["has_embedding_scale"] is mbart
    assert dec["decoder_start_token_id"] == hf["decoder_start_token_id"]
