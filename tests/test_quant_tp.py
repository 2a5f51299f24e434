"""Weight-only quantization and tensor parallelism: the layout, the
arithmetic, and the proof that rank files are right (tp processes joined by
gloo, against the Hugging Face model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from enginefarm.checkpoint import convert_checkpoint, load_rank
from enginefarm.cli import main as cli
from enginefarm.errors import BadInput, StepFailed
from enginefarm.evaluation import builtin_text, check_shards, judge
from enginefarm.families import get_family
from enginefarm.quant import Scheme, as_int8, dequantize, int_values, pack_int4, quantize, unpack_int4
from enginefarm.spec import DEFAULT_QUANT_GATES, Variant
from enginefarm.testing import write_tiny

PROMPTS = ["The build farm", "Engines are rebuilt every night when"]


def variant(quant="none", tp=1, group=None, dtype="float16") -> Variant:
    return Variant(name="t", backend="tensorrt-llm", dtype=dtype, quant=quant, tp=tp, target="cpu", group_size=group)


# ----------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 16])
def test_quantize_layout_and_error_bound(bits, group):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 64, generator=g) * 0.05).half()
    q, s = quantize(w, Scheme(bits, group), torch.float16)
    # per channel int8 [in, out] (int4: two per byte); per group the same bytes
    # viewed as float16, as TensorRT-LLM's WeightOnlyGroupwiseQuantLinear declares
    assert q.dtype == (torch.int8 if group is None else torch.float16)
    width = 1 if group is None else 2
    assert tuple(q.shape) == ((64, 48 // width) if bits == 8 else (64, 24 // width))
    assert tuple(s.shape) == ((48,) if group is None else (64 // group, 48)) and s.dtype == torch.float16
    ints = int_values(q, bits)
    qmax = 127 if bits == 8 else 7
    assert int(ints.max()) <= qmax and int(ints.min()) >= -qmax - 1
    back = dequantize(q, s, bits)
    assert back.shape == w.shape
    step = s.float()[:, None] if group is None else s.float().repeat_interleave(group, 0).t()
    err = (back - w.float()).abs()
    # the integers are computed against the float32 scale, the stored one is
    # rounded to float16 (2^-11 relative): up to qmax x that off at the extremes
    tol = (qmax + 1) * 2.0**-11
    if group is None:
        # TensorRT-LLM's divisor 2^(bits-1): max|w| maps to 128 (8), so the
        # channel's largest weight clamps to 127 (7): within one step; the rest
        # within half a step (of the float32 scale; the stored one is rounded)
        assert bool((err <= step * (1 + tol)).all()), float((err / step).max())
        assert float((err <= step * (0.5 + tol)).float().mean()) > 0.95
    else:
        # ModelOpt's divisor 2^(bits-1) - 1: symmetric, the largest maps to qmax
        assert int(ints.abs().max()) == qmax
        assert bool((err <= step * (0.5 + tol)).all()), float((err / step).max())


def _trtllm_symmetric_quantize(w_in_out: torch.Tensor, bits: int):
    """An independent scalar transcription of the loop TensorRT-LLM's
    `symmetric_quantize_last_axis_of_batched_matrix` runs
    (cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp,
    `symmetric_quantize`): per column, max|w| in float32 times 1/2^(bits-1);
    round() (half away from zero) of the float32 quotient, clamped."""
    import math

    import numpy as np

    a = w_in_out.float().numpy()
    rows, cols = a.shape
    qr = np.float32(1.0 / float(1 << (bits - 1)))
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    scales = np.zeros(cols, np.float32)
    out = np.zeros((rows, cols), np.int8)
    for j in range(cols):
        m = np.float32(0.0)
        for i in range(rows):
            m = max(m, np.float32(abs(a[i, j])))
        scales[j] = np.float32(m * qr)
        for i in range(rows):
            x = float(np.float32(a[i, j]) / scales[j])
            r = math.copysign(math.floor(abs(x) + 0.5), x)
            out[i, j] = int(max(lo, min(hi, r)))
    return torch.from_numpy(out), torch.from_numpy(scales)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_channel_integers_are_tensorrt_llms(bits, dtype):
    """The same integers and scales as TensorRT-LLM's own weight-only
    quantizer (what trtllm-build computes from a float W8A16 checkpoint),
    including weights that land exactly on a half step."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(24, 40, generator=g) * 0.05).to(dtype)
    # ties: a column whose max is 128 (8) x a power of two and entries at k + 0.5 steps
    w[5] = 0
    w[5, 0] = 1.0
    w[5, 1:6] = torch.tensor([0.5, -0.5, 1.5, -2.5, 3.5]) / (128 if bits == 8 else 8)
    q, s = quantize(w, Scheme(bits), dtype)
    ref_q, ref_s = _trtllm_symmetric_quantize(w.t().contiguous(), bits)
    assert torch.equal(int_values(q, bits), ref_q)
    assert torch.equal(s, ref_s.to(dtype))
    # and the integers are the TensorRT-LLM rounding, not torch's half-to-even
    assert int_values(q, bits)[1:6, 5].tolist() == ([1, -1, 2, -3, 4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (bench/gpu_product.sh runs it on the GPU machine)")
@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 128)])
def test_quantize_on_cuda_equals_the_cpu(bits, group):
    """The convert step rounds on the GPU where there is one: the integers
    and scales must be the CPU's, bit for bit, ties included."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(512, 1024, generator=g) * 0.05).to(torch.float16)
    w[7] = 0
    w[7, :4] = torch.tensor([1.0, 0.5 / 128, -2.5 / 128, 3.5 / 8])
    w[9] = 0  # an all-zero channel (group)
    scheme = Scheme(bits, group_size=group)
    q_cpu, s_cpu = quantize(w, scheme, torch.float16)
    q_gpu, s_gpu = quantize(w.cuda(), scheme, torch.float16)
    assert torch.equal(as_int8(q_gpu.cpu()), as_int8(q_cpu))
    assert torch.equal(s_gpu.cpu(), s_cpu)


def test_int4_packing_is_low_nibble_first_and_invertible():
    v = torch.tensor([[-8, 7, 0, -1, 3, -5]], dtype=torch.int8)
    p = pack_int4(v)
    assert p.view(torch.uint8).tolist() == [[0x78, 0xF0, 0xB3]]
    assert torch.equal(unpack_int4(p), v)


def test_quantized_checkpoint_names_shapes_and_config(tmp_path):
    src = write_tiny("llama-h8", tmp_path / "src", seed=1)
    out = tmp_path / "ckpt"
    convert_checkpoint(get_family("llama"), src, out, variant("w4a16", tp=2, group=16))
    cfg, W = load_rank(out, 1)
    # no exclude_modules: TensorRT-LLM's default list keeps embeddings and lm_head unquantized
    assert cfg["quantization"] == {"quant_algo": "W4A16_GPTQ", "kv_cache_quant_algo": None, "group_size": 16,
                                   "has_zero_point": False, "pre_quant_scale": False}
    hidden, inter, d = 64, 160, 8
    qkv = W["transformer.layers.0.attention.qkv.weight"]
    # 8 heads / tp 2 = 4 q heads, 2 kv heads / tp 2 = 1 kv head each for k and v: (4 + 1 + 1) * 8 outputs
    # group-wise: int4 packed 4 to a float16 word, (in, out // 4), as WeightOnlyGroupwiseQuantLinear declares
    assert qkv.dtype == torch.float16 and tuple(qkv.shape) == (hidden, 6 * d // 4)
    assert tuple(W["transformer.layers.0.attention.qkv.weights_scaling_factor"].shape) == (hidden // 16, 6 * d)
    assert tuple(W["transformer.layers.0.mlp.proj.weight"].shape) == (inter // 2, hidden // 4)
    assert W["lm_head.weight"].dtype == torch.float16  # excluded
    assert W["transformer.vocab_embedding.weight"].dtype == torch.float16
    assert "transformer.layers.0.attention.qkv.per_channel_scale" not in W


# ----------------------------------------------------------------------------- the tp check


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """opt-h8 and llama-h8 (8 heads; llama with 2 kv heads), converted at
    tp 1/2/4/8 x none/w8a16/w4a16, fp16."""
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for fam, tiny in (("opt", "opt-h8"), ("llama", "llama-h8")):
        src = write_tiny(tiny, root / tiny, seed=2)
        dirs = {}
        for tp in (1, 2, 4, 8):
            for q in ("none", "w8a16", "w4a16"):
                d = root / f"{tiny}-tp{tp}-{q}"
                convert_checkpoint(get_family(fam), src, d, variant(q, tp))
                dirs[(tp, q)] = d
        out[fam] = (src, dirs)
    return out


@pytest.mark.parametrize("fam", ["opt", "llama"])
def test_shards_match_hf_at_every_tp_and_quantization(converted, fam):
    src, dirs = converted[fam]
    keys = [k for k in dirs if k != (1, "none")]
    res = check_shards(src, [dirs[k] for k in keys], PROMPTS, builtin_text(), max_new_tokens=8, max_eval_tokens=96,
                       max_input_len=32, max_seq_len=64, baseline=dirs[(1, "none")])
    table = []
    for (tp, q), m in zip(keys, res):
        assert m["tp"] == tp
        vb = m["vs_baseline"]
        table.append(f"{fam} tp{tp} {q}: diff {m['logits_max_abs_diff']:.4f} top1 {m['top1_agreement']:.3f} "
                     f"ppl {m['perplexity']['engine']:.2f}/{m['perplexity']['reference']:.2f} "
                     f"vs fp16 tp1: diff {vb['logits_max_abs_diff']:.4f} top1 {vb['top1_agreement']:.3f}")
        if q == "none":
            # fp16 shards at any tp: the HF fp32 model up to fp16 rounding
            assert m["logits_max_abs_diff"] < 0.05, table[-1]
            assert m["top1_agreement"] >= 0.95, table[-1]
            assert vb["logits_max_abs_diff"] < 0.05, table[-1]
        else:
            gates = judge(m, DEFAULT_QUANT_GATES[q].model_dump())
            assert all(g["passed"] for g in gates.values()), (table[-1], gates)
            # and quantization does move the logits (the check sees the quantized weights)
            assert vb["logits_max_abs_diff"] > (0.005 if q == "w8a16" else 0.1), table[-1]
    print("\n".join(table))


def test_swapped_rank_files_fail_the_check(converted, tmp_path):
    src, dirs = converted["llama"]
    bad = tmp_path / "swapped"
    shutil.copytree(dirs[(2, "none")], bad)
    (bad / "rank0.safetensors").rename(bad / "tmp")
    (bad / "rank1.safetensors").rename(bad / "rank0.safetensors")
    (bad / "tmp").rename(bad / "rank1.safetensors")
    (m,) = check_shards(src, [bad], PROMPTS, builtin_text(), max_new_tokens=4, max_eval_tokens=64)
    assert m["logits_max_abs_diff"] > 0.05 or m["top1_agreement"] < 0.95


def test_a_dead_rank_is_reported_with_its_output(converted, tmp_path):
    src, dirs = converted["opt"]
    bad = tmp_path / "truncated"
    shutil.copytree(dirs[(2, "none")], bad)
    f = bad / "rank1.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(StepFailed, match="rank 1"):
        check_shards(src, [bad], PROMPTS, builtin_text(), max_new_tokens=2, max_eval_tokens=32)


# ----------------------------------------------------------------------------- the command


def _unseen_llama(dest: Path) -> Path:
    """A checkpoint the tiny generator does not make: saved by plain
    transformers, GQA (12 heads, 4 kv heads), tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from enginefarm.testing.tiny import make_tokenizer

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=384, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True,
                      max_position_embeddings=128, initializer_range=0.08, bos_token_id=0, eos_token_id=2,
                      pad_token_id=1)
    LlamaForCausalLM(cfg).eval().save_pretrained(dest, safe_serialization=True)
    make_tokenizer().save_pretrained(dest)
    return dest


def test_convert_command_checks_an_unseen_gqa_tied_checkpoint(tmp_path, capsys):
    src = _unseen_llama(tmp_path / "unseen")
    out = tmp_path / "tp4-w8"
    rc = cli(["convert", str(src), "--tp", "4", "--quant", "w8a16", "--out", str(out), "--check", "--json", "--quiet"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0, res
    assert res["check"]["passed"] and res["check"]["tp"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] + [f"rank{i}.safetensors" for i in range(4)]
    # tied embeddings: lm_head is written from the embedding, vocab-split over the ranks
    with safe_open(str(out / "rank3.safetensors"), framework="pt") as f:
        assert tuple(f.get_slice("lm_head.weight").get_shape()) == (384 // 4, 96)

    # 12 heads: tp 8 does not divide them -> exit 2, nothing written
    rc = cli(["convert", str(src), "--tp", "8", "--out", str(tmp_path / "tp8")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not divide the model's 12 attention heads" in err
    assert not (tmp_path / "tp8").exists()


def test_convert_command_bad_inputs_exit_2(tmp_path, capsys):
    src = write_tiny("llama-h8", tmp_path / "src", seed=1)
    # group size 16 does not divide the 40 input channels of a tp 4 mlp.proj shard (160 / 4)
    rc = cli(["convert", str(src), "--tp", "4", "--quant", "w4a16", "--group-size", "16", "--out", str(tmp_path / "o")])
    assert rc == 2 and "group_size 16 does not divide the 40 input channels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    assert cli(["convert", str(src), "--group-size", "16", "--out", str(tmp_path / "o")]) == 2
    assert cli(["convert", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    assert cli(["convert", str(src), "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    capsys.readouterr()


def test_trtllm_build_flags_come_from_the_recipe():
    from enginefarm.backends.tensorrt_llm import build_args

    v = variant("w4a16", tp=2)
    args = build_args("C", "E", v, {"max_batch_size": 8, "max_input_len": 512, "max_seq_len": 1024,
                                    "max_multimodal_len": 8 * 576})
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--max_batch_size"] == "8" and flags["--max_input_len"] == "512"
    assert flags["--max_seq_len"] == "1024" and flags["--max_prompt_embedding_table_size"] == "4608"
    assert flags["--gemm_plugin"] == "float16" and flags["--gpt_attention_plugin"] == "float16"
    assert flags["--workers"] == "2"
    # weight-only GEMMs are chosen by trtllm-build from the checkpoint's
    # quantization section: it has no flag for them (passing one fails)
    assert not [a for a in args if "weight_only" in a]


def test_trtllm_build_flags_for_encoder_decoder():
    """Two runs, encoder then decoder, as TensorRT-LLM's enc-dec examples:
    the decoder takes up to min(max_input_len, max_seq_len) tokens in one pass
    (validation's teacher-forced logits) and attends to the encoder's longest
    input (prompt + a request's share of the prompt table); both gather
    context logits where they make them (not the encoder)."""
    from enginefarm.backends.tensorrt_llm import TensorRTLLM, build_commands

    limits = {"max_batch_size": 4, "max_input_len": 64, "max_seq_len": 48, "max_multimodal_len": 4 * 32}
    enc, dec = build_commands("C", "E", variant("w8a16", tp=2), limits, ("encoder", "decoder"))
    fe, fd = (dict(zip(a[1::2], a[2::2])) for a in (enc, dec))
    assert fe["--checkpoint_dir"] == "C/encoder" and fd["--output_dir"] == "E/decoder"
    assert fe["--max_input_len"] == "96" and fe["--kv_cache_type"] == "disabled"
    assert fe["--max_prompt_embedding_table_size"] == "128" and "--max_prompt_embedding_table_size" not in fd
    assert fd["--max_input_len"] == "48" and fd["--max_seq_len"] == "48" and fd["--max_encoder_input_len"] == "96"
    assert fe["--bert_attention_plugin"] == fd["--gemm_plugin"] == "float16" and fd["--workers"] == "2"
    assert "--gather_context_logits" in dec and "--gather_context_logits" not in enc
    line = TensorRTLLM("tensorrt-llm").command(variant(), limits, parts=("encoder", "decoder"))
    assert line.count("trtllm-build") == 2 and " && " in line


def test_group_size_names_the_variant():
    import yaml

    from enginefarm.spec import Recipe

    r = Recipe.model_validate(yaml.safe_load("""
name: x
family: llama
source: {tiny: llama}
matrix: {quant: [none, w4a16], group_size: 64, tp: [1, 2]}
"""))
    assert [v.name for v in r.variants()] == ["fp16-tp1", "fp16-tp2", "fp16-w4a16g64-tp1", "fp16-w4a16g64-tp2"]
    assert r.variant("fp16-w4a16g64-tp2").group_size == 64 and r.variant("fp16-tp1").group_size is None
    with pytest.raises(Exception, match="power of two"):
        Recipe.model_validate({"name": "x", "family": "llama", "source": {"tiny": "llama"},
                               "matrix": {"group_size": 48}})


# ----------------------------------------------------------------------------- in the DAG


def test_quantized_variant_builds_with_a_shards_step_and_quant_gates(tmp_path, monkeypatch):
    from test_build import recipe_for

    from enginefarm import evaluation
    from enginefarm.flows.build import build
    from enginefarm.store import open_store

    src = write_tiny("llama", tmp_path / "src", seed=4)
    recipe = recipe_for(tmp_path, "q-llama", "llama", src,
                        matrix={"backend": ["aoti"], "dtype": ["float32"], "quant": ["w8a16"], "tp": [1],
                                "target": ["cpu"]}, default_variant=None)
    loads = []
    real = evaluation.load_reference

    def counted(*a, **kw):  # the real loader, counted
        loads.append(a[:1])
        return real(*a, **kw)

    monkeypatch.setattr(evaluation, "load_reference", counted)
    out = build(recipe=str(recipe), store=str(tmp_path / "store"))
    # the Hugging Face model is loaded once, by the reference step: the shards step reads its stored outputs
    assert len(loads) == 1
    v = out["variants"]["fp32-w8a16-tp1"]
    assert v["steps"]["shards"] == "built" and v["shards"]["passed"]
    assert v["validation"] is True
    # judged by the w8a16 gates, not the fp32 ones (greedy tokens need not match)
    assert set(v["gates"]) == {"top1_agreement", "perplexity_rel_diff", "top5_accuracy_drop"}
    st = open_store(str(tmp_path / "store"))
    ckpt = [m for m in st.list_manifests("q-llama", "convert")]
    assert len(ckpt) == 1


def test_attention_windows_are_recorded_for_the_tensorrt_llm_runner(tmp_path):
    """TensorRT-LLM takes Mistral's sliding window and GPT-Neo's local layers
    at run time (max_attention_window_size): the build records them per layer."""
    from enginefarm.backends.tensorrt_llm import runtime_settings

    for family, name in (("mistral", "mistral"), ("gpt-neo", "gpt-neo"), ("llama", "llama")):
        src, out = write_tiny(name, tmp_path / name / "src", seed=3), tmp_path / name / "ckpt"
        convert_checkpoint(get_family(family), src, out, variant())
        got = runtime_settings(out, max_seq_len=64)
        hf = json.loads((src / "config.json").read_text())
        if family == "llama":
            assert got == {}
        elif family == "mistral":
            assert got["max_attention_window_size"] == [hf["sliding_window"]] * hf["num_hidden_layers"]
        else:
            ws = got["max_attention_window_size"]
            assert len(ws) == hf["num_layers"] and set(ws) == {hf["window_size"], 64}


def test_a_nine_head_model_converts_checks_and_plans_at_tp_3(tmp_path, capsys):
    """tp is any size that divides the heads and widths, not only a power of
    two: 9 heads split at 3 (TensorRT-LLM takes any tp that divides them);
    a tp that does not divide them keeps its exit-2 refusal."""
    import yaml

    src = write_tiny("opt", tmp_path / "nine", seed=9, heads=9, hidden=72)  # ffn 144, vocab 384: both divide by 3
    out = tmp_path / "tp3"
    rc = cli(["convert", str(src), "--tp", "3", "--quant", "w8a16", "--out", str(out), "--check", "--json", "--quiet"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0, res
    assert res["check"]["passed"] and res["check"]["tp"] == 3
    cfg, W = load_rank(out, 2)
    assert cfg["mapping"]["tp_size"] == 3 and tuple(W["transformer.layers.0.attention.qkv.weight"].shape) == (72, 72)

    recipe = tmp_path / "nine.yaml"
    recipe.write_text(yaml.safe_dump({"name": "nine", "family": "opt", "source": {"path": str(src)},
                                      "matrix": {"backend": ["tensorrt-llm"], "dtype": ["float16"],
                                                 "quant": ["w8a16"], "tp": [3], "target": ["sm_90"]}}))
    assert cli(["plan", str(recipe), "--store", str(tmp_path / "store")]) == 0
    text = capsys.readouterr().out
    assert "fp16-w8a16-tp3" in text and "--workers 3" in text

    # 9 heads: tp 2 and 4 do not divide them -> exit 2, nothing written
    for tp in (2, 4):
        rc = cli(["convert", str(src), "--tp", str(tp), "--out", str(tmp_path / f"tp{tp}")])
        assert rc == 2 and "does not divide the model's 9 attention heads" in capsys.readouterr().err
        assert not (tmp_path / f"tp{tp}").exists()
    # a tp no model can take is refused with the recipe
    recipe.write_text(yaml.safe_dump({"name": "nine", "family": "opt", "source": {"path": str(src)},
                                      "matrix": {"tp": [0]}}))
    assert cli(["plan", str(recipe)]) == 2
    assert "a whole number from 1 to 64" in capsys.readouterr().err


def test_each_layout_names_the_tensorrt_llm_releases_it_serves(tmp_path, capsys):
    """README, `enginefarm plan` and engine.json (hence the publish manifest)
    name the TensorRT-LLM releases a checkpoint layout serves."""
    from enginefarm.backends.tensorrt_llm import RELEASES, release_range

    assert list(release_range("decoder")) == ["decoder-only"]
    assert list(release_range("encoder-decoder", "w8a16")) == ["encoder-decoder", "weight-only per channel"]
    assert list(release_range("decoder", "w4a16", 64)) == ["decoder-only", "weight-only per group"]
    assert "NOT 0.16" in RELEASES["encoder-decoder"]["range"] and all(r["evidence"] for r in RELEASES.values())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for layout in RELEASES:
        assert f"| {layout} |" in readme, layout
    assert cli(["plan", "flan-t5-small", "--store", str(tmp_path / "s"), "--variant", "fp16-tp1"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint serves TensorRT-LLM: encoder-decoder:" in out and "NOT 0.16" in out


def test_group_wise_checkpoints_run_in_the_shards_check(tmp_path):
    """Per-group weights are stored viewed in the model dtype (as TensorRT-LLM
    declares them); the runtime that the shards step runs reads the same
    integers back and passes the quantization gates at tp 2."""
    src = write_tiny("llama-h8", tmp_path / "src", seed=2)
    dirs = []
    for q in ("w8a16", "w4a16"):
        d = tmp_path / q
        convert_checkpoint(get_family("llama"), src, d, variant(q, 2, group=16))
        _, W = load_rank(d, 1)
        assert W["transformer.layers.0.mlp.fc.weight"].dtype == torch.float16
        dirs.append(d)
    res = check_shards(src, dirs, PROMPTS, builtin_text(), max_new_tokens=8, max_eval_tokens=96, max_input_len=32,
                       max_seq_len=64)
    for q, m in zip(("w8a16", "w4a16"), res):
        gates = judge(m, DEFAULT_QUANT_GATES[q].model_dump())
        assert m["tp"] == 2 and all(g["passed"] for g in gates.values()), (q, m["top1_agreement"], gates)


def test_encoder_decoder_names_for_releases_before_the_rename(tmp_path):
    """0.16's EncoderModel/DecoderModel name their tensors after their modules
    (encoder_layers.N, embedding.*, final_layernorm); the build renames a copy
    of the farm's transformer.* checkpoint where the installed release wants
    that. Every tensor of a T5 and a BART checkpoint lands on such a name, and
    nothing else changes."""
    from enginefarm.backends.tensorrt_llm import rename_for_legacy

    for fam, tiny in (("t5", "t5"), ("bart", "bart")):
        src = write_tiny(tiny, tmp_path / tiny, seed=1)
        ckpt, legacy = tmp_path / f"{tiny}-ckpt", tmp_path / f"{tiny}-legacy"
        convert_checkpoint(get_family(fam), src, ckpt, variant("w8a16", tp=2))
        rename_for_legacy(ckpt, legacy)
        for part in ("encoder", "decoder"):
            for rank in (0, 1):
                _, new = load_rank(ckpt / part, rank)
                cfg, old = load_rank(legacy / part, rank)
                assert cfg == json.loads((ckpt / part / "config.json").read_text())
                allowed = (f"{part}_layers.", "embedding.vocab_embedding.", "embedding.position_embedding.",
                           "embedding.embedding_layernorm.", "final_layernorm.", "lm_head.", "rel_attn_table")
                assert all(k.startswith(allowed) for k in old), sorted(old)
                assert len(old) == len(new) and sorted(v.numel() for v in old.values()) == sorted(
                    v.numel() for v in new.values())
                assert torch.equal(old[f"{part}_layers.1.mlp.fc.weight"], new["transformer.layers.1.mlp.fc.weight"])
                assert torch.equal(old["embedding.vocab_embedding.weight"], new["transformer.vocab_embedding.weight"])


# ----------------------------------------------------------------------------- AWQ (w4a16_awq)


def _awq_scales(src: Path, seed: int = 5) -> dict:
    """Positive per-input-channel scales for every linear of a tiny llama,
    the same for q/k/v and for gate/up (so the fused tensors' mean is each one's)."""
    from safetensors.torch import load_file

    W = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in W.items():
        if name.endswith("proj.weight"):
            out[name[: -len("weight")] + "pre_quant_scale"] = None
    for name in list(out):
        base = name.rsplit(".", 2)[0]  # model.layers.i.self_attn / mlp
        key = base + (".qkv" if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj") else
                      ".gu" if name.split(".")[-2] in ("gate_proj", "up_proj") else "." + name.split(".")[-2])
        width = W[name[: -len("pre_quant_scale")] + "weight"].shape[1]
        out.setdefault("_" + key, torch.rand(width, generator=g) * 1.5 + 0.25)
        out[name] = out["_" + key]
    return {k: v for k, v in out.items() if not k.startswith("_")}


def test_awq_checkpoint_layout_and_arithmetic(tmp_path):
    """TensorRT-LLM's W4A16_AWQ layout (WeightOnlyGroupwiseQuantLinear with
    pre_quant_scale: the group-wise weight and scales plus
    prequant_scaling_factor (1, in)); weight / s quantized, x * s at run time:
    dequantized weight x s is the original weight within the group error."""
    from safetensors.torch import load_file

    src = write_tiny("llama-h8", tmp_path / "src", seed=1)
    cal = _awq_scales(src)
    out = tmp_path / "ckpt"
    with pytest.raises(BadInput, match="calibrate step"):
        convert_checkpoint(get_family("llama"), src, out, variant("w4a16_awq", dtype="float32", group=16))
    convert_checkpoint(get_family("llama"), src, out, variant("w4a16_awq", dtype="float32", group=16),
                       calibration=cal)
    cfg, W = load_rank(out, 0)
    assert cfg["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 16,
                                   "has_zero_point": False, "pre_quant_scale": True}
    hf = load_file(str(src / "model.safetensors"))
    for trt, hf_names in (("attention.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                          ("mlp.proj", ("mlp.down_proj",))):
        p = f"transformer.layers.0.{trt}."
        pqs = W[p + "prequant_scaling_factor"]
        s = cal[f"model.layers.0.{hf_names[0]}.pre_quant_scale"]
        assert tuple(pqs.shape) == (s.numel(),) and torch.allclose(pqs, s)
        back = dequantize(W[p + "weight"], W[p + "weights_scaling_factor"], 4) * pqs
        orig = torch.cat([hf[f"model.layers.0.{n}.weight"] for n in hf_names])
        step = (W[p + "weights_scaling_factor"].repeat_interleave(16, 0).t() * pqs)
        assert bool(((back - orig).abs() <= step * 0.5 + 1e-6).all())
    # the lm head and embeddings stay float
    assert "lm_head.prequant_scaling_factor" not in W and W["lm_head.weight"].dtype == torch.float32


def test_awq_scales_follow_the_tensor_parallel_split(tmp_path):
    """Row-parallel linears (attention.dense, mlp.proj) split their inputs,
    and their pre-quant scales with them; column-parallel ones keep them whole."""
    src = write_tiny("llama-h8", tmp_path / "src", seed=1)
    cal = _awq_scales(src)
    out = tmp_path / "ckpt"
    convert_checkpoint(get_family("llama"), src, out, variant("w4a16_awq", tp=2, dtype="float32", group=16),
                       calibration=cal)
    down = cal["model.layers.0.mlp.down_proj.pre_quant_scale"]
    q = cal["model.layers.0.self_attn.q_proj.pre_quant_scale"]
    for rank in (0, 1):
        _, W = load_rank(out, rank)
        half = down.numel() // 2
        assert torch.equal(W["transformer.layers.0.mlp.proj.prequant_scaling_factor"],
                           down[rank * half:(rank + 1) * half])
        # q/k/v's shared scale is their mean (equal here): equal to float rounding
        assert torch.allclose(W["transformer.layers.0.attention.qkv.prequant_scaling_factor"], q, rtol=1e-6, atol=0)


def test_awq_group_size_is_128_or_64_where_128_does_not_divide():
    from enginefarm.quant import awq_group_size

    assert awq_group_size({"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}) == 128
    # SmolLM2-135M: hidden 576 = 4.5 x 128
    assert awq_group_size({"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                           "head_dim": 64}) == 64
    assert awq_group_size({"hidden_size": 576}, asked=32) == 32
    with pytest.raises(BadInput, match="group size"):
        awq_group_size({"hidden_size": 96, "intermediate_size": 96, "num_attention_heads": 3})


def test_awq_joint_scales_and_clip_search_reach_the_checkpoint(tmp_path):
    """calibration.awq_refine on a tiny llama's own activations: q/k/v get
    one searched scale (fused_linears names them), every linear clip ratios;
    the converter writes that scale and clips block by block, so each
    block's output error on the calibration inputs is no larger than
    without the clip."""
    from transformers import AutoModelForCausalLM

    from enginefarm import calibration
    from enginefarm.checkpoint import fused_linears
    from enginefarm.quant import fake_quantize_groups

    src = write_tiny("llama-h8", tmp_path / "src", seed=1)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, model.config.vocab_size, (24,), generator=g).tolist() for _ in range(3)]
    inputs, weights = calibration.linear_inputs(model, samples)
    v = variant("w4a16_awq", dtype="float32", group=16)
    fused = fused_linears(get_family("llama"), src, v)
    assert fused == [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)]
    # per-linear scales, all different (as ModelOpt's AWQ-lite finds them)
    start = {f"{n}.pre_quant_scale": torch.rand(w.shape[1], generator=g) + 0.5 for n, w in weights.items()}
    stats, summary = calibration.awq_refine(start, inputs, weights, 16, fused, clip=True)
    assert summary["awq_joint_groups"] == 2 and summary["awq_clipped_linears"] == 2 * 7
    for i in range(2):
        q, k, vv = (stats[f"model.layers.{i}.self_attn.{p}_proj.pre_quant_scale"] for p in "qkv")
        assert torch.equal(q, k) and torch.equal(q, vv) and not torch.equal(q, start[
            f"model.layers.{i}.self_attn.q_proj.pre_quant_scale"])
    down = "model.layers.0.mlp.down_proj"
    assert torch.equal(stats[f"{down}.pre_quant_scale"], start[f"{down}.pre_quant_scale"])  # not fused: kept
    assert float(stats[f"{down}.awq_clip"].min()) < 1.0  # some block is clipped
    # the calibrate step saves them with safetensors, which refuses strided tensors (it did, on SmolLM2)
    assert all(t.is_contiguous() for t in stats.values())

    noclip = {k: t for k, t in stats.items() if not k.endswith(".awq_clip")}
    conv = {}
    for label, cal in (("clip", stats), ("noclip", noclip)):
        convert_checkpoint(get_family("llama"), src, tmp_path / label, v, calibration=cal)
        conv[label] = load_rank(tmp_path / label, 0)[1]
    W = conv["clip"]
    assert torch.allclose(W["transformer.layers.0.attention.qkv.prequant_scaling_factor"],
                          stats["model.layers.0.self_attn.q_proj.pre_quant_scale"])
    p = "transformer.layers.0.mlp.proj."
    pqs = stats[f"{down}.pre_quant_scale"]
    ws = weights[down] / pqs
    xb = (torch.cat(inputs[down]) * pqs).reshape(-1, ws.shape[1] // 16, 16)
    errs = {}
    for label, Wl in conv.items():
        back = dequantize(Wl[p + "weight"], Wl[p + "weights_scaling_factor"], 4)
        errs[label] = torch.einsum("nbg,obg->bno", xb, (ws - back).reshape(ws.shape[0], -1, 16)).pow(2).mean(1)
    assert bool((errs["clip"] <= errs["noclip"] * (1 + 1e-4) + 1e-9).all())
    assert float(errs["clip"].sum()) < float(errs["noclip"].sum())
    # the search's arithmetic is the converter's: fake quantization = quantize + dequantize
    q, sc = quantize(ws, Scheme(4, 16), torch.float32)
    assert torch.allclose(fake_quantize_groups(ws, 16), dequantize(q, sc, 4), atol=1e-6)
