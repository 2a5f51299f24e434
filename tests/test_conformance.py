"""Conformance with NVIDIA's own TensorRT-LLM checkpoint writer, ModelOpt
(`nvidia-modelopt` 0.47, a dev dependency): the tiny model of every family
ModelOpt covers is exported by ModelOpt and converted by the farm, at tp 1
and 2, unquantized, W8A16 and W4A16 (per group: ModelOpt's only weight-only
int4 export), and the two checkpoints must agree tensor for tensor: names,
shapes, dtypes and values. What differs is listed once, in DIFFERENCES,
each with its reason; the comparison applies exactly those and nothing else.

ModelOpt runs here on CPU. Its `export_tensorrt_llm_checkpoint` is a loop
over `torch_to_tensorrt_llm_checkpoint`, which yields (config, weights) per
rank; the test takes those directly (nothing written). ModelOpt 0.47 still
converts GPT-J and BLOOM weights but its config writer
(`convert_to_tensorrt_llm_config`) refuses them ("not supported by
TensorRT-LLM yet"; its TensorRT-LLM export is frozen): for those two the
writer is replaced for the duration of the export and only the tensors are
compared.

Families ModelOpt does not cover (OPT, GPT-Neo, GPT-NeoX) and the layout of
TensorRT-LLM's own converters are covered elsewhere (tests/test_quant_tp.py
holds the quantizer's integers against a transcription of TensorRT-LLM's C++
loop).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import numpy as np
import pytest
import torch

from enginefarm.checkpoint import convert_checkpoint, load_rank
from enginefarm.families import get_family
from enginefarm.quant import as_int8, int_values, is_quantized_weight, unpack_int4
from enginefarm.spec import Variant
from enginefarm.testing import write_tiny

# a dev dependency (pyproject.toml): imported outright, so that CI fails rather than skips without it
import modelopt.torch.export.model_config_export as mce  # noqa: E402
import modelopt.torch.quantization as mtq  # noqa: E402

# family -> ModelOpt's decoder_type
FAMILIES = {"gpt2": "gpt", "llama": "llama", "mistral": "llama", "gptj": "gptj", "bloom": "bloom", "qwen2": "qwen",
            "t5": "t5", "bart": "bart"}
ENC_DEC = ("t5", "bart")
GROUP = 16  # ModelOpt's default block of 128 exceeds the tiny models' 64 channels

# ------------------------------------------------------------------------------------------------
# The legitimate differences, once. Each is applied by name below; anything else must be equal.
DIFFERENCES = {
    "parallel_embedding":
        "ModelOpt sets use_parallel_embedding (embedding_sharding_dim 0): each rank holds its 1/tp of the vocab "
        "(and position) table rows; the farm keeps the tables whole on every rank (use_parallel_embedding false), "
        "as TensorRT-LLM's own converters do by default. Compared: ModelOpt's rank r rows == rows r of the farm's "
        "table (padded to a multiple of tp).",
    "gptj_row_bias":
        "GPT-J adds attention and MLP partial sums before one all-reduce, so mlp.proj's bias must be added once: "
        "the farm writes it on rank 0 and zeros on the others; ModelOpt writes it on every rank and TensorRT-LLM's "
        "loader zeroes it on tp_rank > 0 for GPTJForCausalLM (tensorrt_llm/models/modeling_utils.py "
        "`preprocess_weights`, last loop). Compared after that step.",
    "t5_decoder_rel_attn_table":
        "TensorRT-LLM's DecoderModel declares a top-level `rel_attn_table` Parameter [heads/tp, num_buckets] when "
        "relative_attention and not use_implicit_relative_attention (tensorrt_llm/models/enc_dec/model.py, "
        "DecoderModel.__init__); ModelOpt does not write it. The farm does, equal to layer 0's self-attention table "
        "(which ModelOpt does write).",
    "bart_lm_head_bias":
        "BART's final_logits_bias: the farm writes it as lm_head.bias (has_lm_head_bias true; DecoderModel's "
        "lm_head has a bias then); ModelOpt drops it (no has_lm_head_bias in its config). Compared with the "
        "Hugging Face buffer.",
    "w8a16_layout":
        "ModelOpt's INT8_WEIGHT_ONLY export writes int8 [out, in] + float32 `weights_scaling_factor` = max|w|/127: "
        "the layout of ModelOpt's unified Hugging Face / PyTorch-backend export. trtllm-build does not consume it: "
        "for W8A16 it runs TensorRT-LLM's own quantizer on float weights (models/modeling_utils.py "
        "preprocess_weights -> models/convert_utils.py weight_only_quantize_dict -> "
        "torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix, max|w|/128) and skips int8 tensors; "
        "TensorRT-LLM's own ModelOpt flow for int8_wo exports float weights (EMPTY_CFG) and sets quant_algo W8A16 "
        "(tensorrt_llm/quantization/quantize_by_modelopt.py). The farm writes what that build computes: int8 "
        "[in, out] + `per_channel_scale` [out] in the model dtype (quantization/layers.py WeightOnlyQuantLinear). "
        "Compared: the farm's integers and scales == TensorRT-LLM's quantizer (transcribed below) applied to "
        "ModelOpt's float export; and with ModelOpt's int8 export: the same per-channel max|w| and dequantized "
        "weights within a step (ModelOpt takes a row-parallel layer's max|w| before splitting it over the "
        "ranks, TensorRT-LLM's quantizer per rank's shard).",
    "w4a16_group_layout":
        "ModelOpt's int4 block export is W4A16_AWQ: packed int8 [out/2, in] (two output rows a byte) + float32 "
        "weights_scaling_factor [out, in/G], pre_quant_scale true, no prequant tensor; trtllm-build transposes, "
        "interleaves and views AWQ weights itself (models/modeling_utils.py preprocess_perlayer_weights). The farm "
        "writes W4A16_GPTQ without zero point, the layout quantization/layers.py WeightOnlyGroupwiseQuantLinear "
        "declares: the packed int4 [in, out/2] bytes viewed as the model dtype [in, out/4] and "
        "weights_scaling_factor [in/G, out] in the model dtype. Compared: the same integers (ModelOpt's block "
        "quantizer: max|w|/7, round half to even) and the same scales rounded to the model dtype.",
    "quant_exclude_modules":
        "ModelOpt writes exclude_modules ['lm_head']; TensorRT-LLM reads a list there as the whole exclusion list "
        "(quantization/quantize.py quantize_layers), which would quantize the vocab embedding. The farm writes "
        "none, so TensorRT-LLM's default list ('*lm_head', '*vocab_embedding', '*position_embedding', ...) applies.",
}
# config.json keys both write but set differently, with the reason (every other shared key must be equal)
CONFIG_DIFFERENCES = {
    "use_parallel_embedding": "see DIFFERENCES['parallel_embedding']",
    "mapping": "the farm adds rank 0 (TensorRT-LLM's Mapping takes it); world/tp/pp sizes are compared",
    "quantization": "ModelOpt adds quantized_layers {} / exclude_modules; quant_algo, kv_cache_quant_algo and "
                    "group_size are compared (see DIFFERENCES['quant_exclude_modules'])",
    "logits_dtype": "a choice: the farm asks for float32 logits from encoder-decoder engines, ModelOpt the model dtype",
    "architecture": "GPT-2: without tensorrt_llm installed ModelOpt writes the Hugging Face class name "
                    "(GPT2LMHeadModel); TensorRT-LLM's model is GPTForCausalLM (its models/__init__.py MODEL_MAP)",
    "position_embedding_type": "GPT-2: ModelOpt's default rope_gpt_neox where its decoder config names none; GPT-2 "
                               "has learned absolute positions (TensorRT-LLM's GPT converter: learned_absolute)",
    "hidden_act": "GPT-2: 'gelu' (ModelOpt) and 'gelu_new' (farm) are one function in TensorRT-LLM (tanh GELU), "
                  "which is what Hugging Face's gelu_new computes",
    "layernorm_type": "T5: ModelOpt writes 0 (LayerNorm); T5's norm has no mean and no bias, RmsNorm (1), as "
                      "TensorRT-LLM's enc_dec converter writes for t5",
    "rescale_before_lm_head": "T5 with tied embeddings scales the decoder output by d_model**-0.5 (transformers "
                              "T5ForConditionalGeneration); ModelOpt writes false",
    "max_position_embeddings": "T5: unused (relative attention); ModelOpt writes 2048, the farm n_positions (512)",
    "rank": "ModelOpt records the rank in config.json; the farm writes one config.json for all ranks",
}


def variant(quant: str, tp: int, group=None) -> Variant:
    return Variant(name="c", backend="tensorrt-llm", dtype="float16", quant=quant, tp=tp, target="cpu",
                   group_size=group)


@contextlib.contextmanager
def _config_writer_for(decoder_type: str):
    """For GPT-J and BLOOM, ModelOpt's config writer refuses; its tensors are
    still converted. Replace the writer (only for those two) meanwhile."""
    if decoder_type not in ("gptj", "bloom"):
        yield
        return
    orig = mce.convert_to_tensorrt_llm_config
    mce.convert_to_tensorrt_llm_config = lambda *a, **k: {"refused_by_modelopt": True}
    try:
        yield
    finally:
        mce.convert_to_tensorrt_llm_config = orig


def _quiet():
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")


def calibrated_exports(root, families, runs) -> dict:
    """ModelOpt calibration of each tiny family's fp16 model on the same samples, then at tp 1 and 2 ModelOpt's
    export next to the farm's conversion with the statistics kept: {(family, label, tp): (ModelOpt's ranks, the
    farm's ranks, the Hugging Face tensors, what was kept)}. runs: (label, ModelOpt algorithm, group size, the
    farm's Variant for a tp)."""
    from modelopt.torch.quantization.plugins import custom, huggingface
    from transformers import AutoModelForCausalLM

    from enginefarm import calibration

    _quiet()
    hook = huggingface.register_hf_attentions_on_the_fly  # see exports()
    had = hook in custom.CUSTOM_MODEL_PLUGINS
    custom.CUSTOM_MODEL_PLUGINS.discard(hook)
    got = {}
    try:
        for fam in families:
            src = write_tiny(fam, root / fam, seed=5)
            base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).eval().half()
            hf = {k: v.detach().clone() for k, v in base.state_dict().items()}
            g = torch.Generator().manual_seed(0)
            samples = [torch.randint(0, base.config.vocab_size, (24,), generator=g).tolist() for _ in range(4)]
            for label, algo, group, variant_at in runs:
                m = copy.deepcopy(base)
                calibration.run_modelopt(m, samples, algo, group)
                stats, kept = calibration.kept_statistics(m)
                for tp in (1, 2):
                    mo = modelopt_export(copy.deepcopy(m), fam, tp)
                    d = root / f"{fam}-{label}-tp{tp}"
                    convert_checkpoint(get_family(fam), src, d, variant_at(tp), calibration=stats)
                    got[(fam, label, tp)] = (mo, {(p, r): load_rank(d, r) for p, r in mo}, hf, kept)
    finally:
        if had:
            custom.CUSTOM_MODEL_PLUGINS.add(hook)
    return got


def modelopt_export(model, fam: str, tp: int) -> dict:
    """{(part, rank): (config, tensors)} from ModelOpt."""
    import io
    from contextlib import redirect_stdout

    out = {}
    with _config_writer_for(FAMILIES[fam]), redirect_stdout(io.StringIO()):
        ranks = list(mce.torch_to_tensorrt_llm_checkpoint(model, decoder_type=FAMILIES[fam], dtype=torch.float16,
                                                          inference_tensor_parallel=tp))
    parts = ("encoder", "decoder") if fam in ENC_DEC else ("",)
    assert len(ranks) == len(parts) * tp
    for i, (cfg, weights, _) in enumerate(ranks):
        out[(parts[i // tp], i % tp)] = (cfg, {k: v.contiguous() for k, v in weights.items()})
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every (family, quant, tp): the ModelOpt export and the farm's
    checkpoint, made once for all the tests."""
    _quiet()
    root = tmp_path_factory.mktemp("conf")
    got = {}
    # ModelOpt's KV-cache hook rewrites each Hugging Face attention class from
    # its source (AST) on first quantize; with transformers 5 that fails on some
    # (an IndexError in plugins/attention.py). Weight-only quantization uses no
    # KV-cache quantizer, so the hook is left out while the exports are made.
    from modelopt.torch.quantization.plugins import custom, huggingface

    hook = huggingface.register_hf_attentions_on_the_fly
    had_hook = hook in custom.CUSTOM_MODEL_PLUGINS
    custom.CUSTOM_MODEL_PLUGINS.discard(hook)
    try:
        _export_all(root, got)
    finally:
        if had_hook:
            custom.CUSTOM_MODEL_PLUGINS.add(hook)
    return got


def _export_all(root, got: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for fam in FAMILIES:
        src = write_tiny(fam, root / fam, seed=5)
        cls = AutoModelForSeq2SeqLM if fam in ENC_DEC else AutoModelForCausalLM
        # .half(): Hugging Face keeps T5's `wo` in float32 even when asked for
        # float16 (_keep_in_fp32_modules); the farm, like TensorRT-LLM's
        # converters, quantizes the weights in the model dtype, so ModelOpt is
        # given the same float16 weights
        base = cls.from_pretrained(src, dtype=torch.float16).eval().half()
        hf = {k: v.detach().clone() for k, v in base.state_dict().items()}
        for quant in ("none", "w8a16", "w4a16"):
            for tp in (1, 2):
                m = copy.deepcopy(base)
                if quant == "w8a16":
                    m = mtq.quantize(m, mtq.INT8_WEIGHT_ONLY_CFG, forward_loop=None)
                elif quant == "w4a16":
                    cfg = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
                    for e in cfg["quant_cfg"]:
                        if e.get("quantizer_name") == "*weight_quantizer":
                            e["cfg"]["block_sizes"] = {-1: GROUP, "type": "static"}
                    m = mtq.quantize(m, cfg, forward_loop=None)
                mo = modelopt_export(m, fam, tp)
                d = root / f"{fam}-{quant}-tp{tp}"
                convert_checkpoint(get_family(fam), src, d, variant(quant, tp, GROUP if quant == "w4a16" else None))
                farm = {(part, r): load_rank(d / part, r) for part, r in mo}
                got[(fam, quant, tp)] = (mo, farm, hf)


CASES = [(fam, tp) for fam in FAMILIES for tp in (1, 2)]


def _rows(table: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    pad = (-table.shape[0]) % tp
    if pad:
        table = torch.cat([table, table.new_zeros(pad, *table.shape[1:])])
    return table.chunk(tp)[rank]


def _compare_float_tensors(fam, tp, part, rank, mo_w: dict, farm_w: dict, hf: dict, skip=()) -> list[str]:
    """Names, shapes, dtypes, values of every tensor, DIFFERENCES applied."""
    diffs = []
    names_mo, names_farm = set(mo_w) - set(skip), set(farm_w) - set(skip)
    only_farm = names_farm - names_mo
    if fam == "t5" and part == "decoder":  # DIFFERENCES["t5_decoder_rel_attn_table"]
        assert torch.equal(farm_w["rel_attn_table"], farm_w["transformer.layers.0.self_attention.rel_attn_table"])
        only_farm.discard("rel_attn_table")
    if fam == "bart" and part == "decoder":  # DIFFERENCES["bart_lm_head_bias"]
        want = _rows(hf["final_logits_bias"].reshape(-1), tp, rank)
        assert torch.equal(farm_w["lm_head.bias"], want)
        only_farm.discard("lm_head.bias")
    if only_farm or names_mo - names_farm:
        diffs.append(f"{part} rank {rank}: only farm {sorted(only_farm)}, only ModelOpt {sorted(names_mo - names_farm)}")
    for k in sorted(names_mo & names_farm):
        a, b = mo_w[k], farm_w[k]
        if k.endswith(("vocab_embedding.weight", "position_embedding.weight")) and tp > 1:
            b = _rows(b, tp, rank)  # DIFFERENCES["parallel_embedding"]
        if fam == "gptj" and rank > 0 and k.endswith(("mlp.proj.bias", "attention.dense.bias")):
            a = torch.zeros_like(a)  # DIFFERENCES["gptj_row_bias"]: TensorRT-LLM's loader zeroes it
        if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
            diffs.append(f"{part} rank {rank} {k}: ModelOpt {a.dtype} {tuple(a.shape)}, farm {b.dtype} {tuple(b.shape)}")
        elif not torch.equal(a, b):
            diffs.append(f"{part} rank {rank} {k}: values differ by {float((a.float() - b.float()).abs().max())}")
    return diffs


def _compare_config(mo_cfg: dict, farm_cfg: dict, where: str,
                    quant_keys=("quant_algo", "kv_cache_quant_algo", "group_size")) -> list[str]:
    if mo_cfg.get("refused_by_modelopt"):
        return []
    diffs = []
    for k in sorted(set(mo_cfg) & set(farm_cfg)):
        if k in CONFIG_DIFFERENCES:
            continue
        if mo_cfg[k] != farm_cfg[k]:
            diffs.append(f"{where} config {k}: ModelOpt {mo_cfg[k]!r}, farm {farm_cfg[k]!r}")
    for k in ("world_size", "tp_size", "pp_size"):
        if mo_cfg["mapping"][k] != farm_cfg["mapping"][k]:
            diffs.append(f"{where} mapping.{k}")
    for k in quant_keys:
        if (mo_cfg["quantization"].get(k), farm_cfg["quantization"].get(k)) not in ((None, None),) and \
                mo_cfg["quantization"].get(k) != farm_cfg["quantization"].get(k):
            diffs.append(f"{where} quantization.{k}: ModelOpt {mo_cfg['quantization'].get(k)!r}, "
                         f"farm {farm_cfg['quantization'].get(k)!r}")
    assert "exclude_modules" not in farm_cfg["quantization"]  # DIFFERENCES["quant_exclude_modules"]
    return diffs


@pytest.mark.parametrize("fam,tp", CASES)
def test_unquantized_equals_modelopt(exports, fam, tp):
    mo, farm, hf = exports[(fam, "none", tp)]
    diffs = []
    for (part, rank), (mo_cfg, mo_w) in mo.items():
        farm_cfg, farm_w = farm[(part, rank)]
        diffs += _compare_float_tensors(fam, tp, part, rank, mo_w, farm_w, hf)
        if rank == 0:
            diffs += _compare_config(mo_cfg, farm_cfg, part or "llm")
    assert not diffs, "\n".join(diffs)


def trtllm_weight_only_quantize(w_out_in: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """TensorRT-LLM's symmetric_quantize (cpp/tensorrt_llm/kernels/cutlass_kernels/
    cutlass_preprocessors.cpp), vectorised in numpy, on the transposed [in, out]
    matrix as weight_only_quantize passes it: per column max|w| in float32 times
    1/2^(bits-1); round() (half away from zero) of the float32 quotient; clamp."""
    a = w_out_in.detach().t().float().numpy()
    scale = (np.abs(a).max(axis=0) * np.float32(1.0 / (1 << (bits - 1)))).astype(np.float32)
    x = (a / scale[None, :]).astype(np.float32).astype(np.float64)
    r = np.sign(x) * np.floor(np.abs(x) + 0.5)
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    return np.clip(r, lo, hi).astype(np.int8), scale


@pytest.mark.parametrize("fam,tp", CASES)
def test_w8a16_is_what_trtllm_build_computes_from_modelopts_weights(exports, fam, tp):
    float_mo, _, hf = exports[(fam, "none", tp)]
    mo, farm, _ = exports[(fam, "w8a16", tp)]
    diffs, n_quantized = [], 0
    for (part, rank), (mo_cfg, mo_w) in mo.items():
        farm_cfg, farm_w = farm[(part, rank)]
        assert farm_cfg["quantization"]["quant_algo"] == mo_cfg.get("quantization", {}).get("quant_algo", "W8A16") == "W8A16"
        qnames = [k for k in farm_w if is_quantized_weight(k)]
        # every tensor but the quantized ones: as unquantized
        skip = set(qnames) | {k[: -len("weight")] + s for k in qnames
                              for s in ("per_channel_scale", "weights_scaling_factor")}
        diffs += _compare_float_tensors(fam, tp, part, rank, mo_w, farm_w, hf, skip=skip)
        if rank == 0:
            diffs += _compare_config(mo_cfg, farm_cfg, part or "llm")
        for k in qnames:  # DIFFERENCES["w8a16_layout"]
            n_quantized += 1
            p = k[: -len("weight")]
            q, s = farm_w[k], farm_w[p + "per_channel_scale"]
            assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.dim() == 2
            # (1) TensorRT-LLM's quantizer on ModelOpt's float export: the same integers and scales
            ref_q, ref_s = trtllm_weight_only_quantize(float_mo[(part, rank)][1][k], 8)
            if not (np.array_equal(q.numpy(), ref_q) and torch.equal(s, torch.from_numpy(ref_s).half())):
                diffs.append(f"{part} rank {rank} {k}: not TensorRT-LLM's integers")
            # (2) ModelOpt's own int8 [out, in] export. ModelOpt takes max|w| of the whole
            # output row before it splits a row-parallel layer over the ranks; TensorRT-LLM's
            # quantizer (and the farm) of the rank's shard: equal at tp 1 and for
            # column-parallel layers, at most ModelOpt's for row-parallel ones. Dequantized:
            # within half a ModelOpt step + one farm step (its max clamps to 127) of each other.
            mq, ms = mo_w[k], mo_w[p + "weights_scaling_factor"]
            assert mq.dtype == torch.int8 and tuple(mq.shape) == tuple(q.t().shape)
            amax_mo, amax_farm = ms.float() * 127, torch.from_numpy(ref_s).float() * 128
            row_parallel = k.endswith(("attention.dense.weight", "mlp.proj.weight"))
            if tp == 1 or not row_parallel:
                assert torch.allclose(amax_mo, amax_farm, rtol=1e-6), k
            else:
                assert bool((amax_farm <= amax_mo * (1 + 1e-6)).all()), k
            deq_mo, deq_farm = mq.float() * ms.float()[:, None], q.t().float() * s.float()[:, None]
            bound = (ms.float() * 0.5 + s.float() * 1.0)[:, None] * 1.01
            assert bool(((deq_mo - deq_farm).abs() <= bound).all()), k
    assert n_quantized and not diffs, "\n".join(diffs)


@pytest.mark.parametrize("fam,tp", CASES)
def test_w4a16_per_group_equals_modelopts_integers(exports, fam, tp):
    mo, farm, hf = exports[(fam, "w4a16", tp)]
    diffs, n_quantized = [], 0
    for (part, rank), (mo_cfg, mo_w) in mo.items():
        farm_cfg, farm_w = farm[(part, rank)]
        assert farm_cfg["quantization"]["quant_algo"] == "W4A16_GPTQ"
        assert farm_cfg["quantization"]["group_size"] == GROUP and not farm_cfg["quantization"]["has_zero_point"]
        if not mo_cfg.get("refused_by_modelopt"):
            assert mo_cfg["quantization"]["quant_algo"] == "W4A16_AWQ" and mo_cfg["quantization"]["group_size"] == GROUP
        qnames = [k for k in farm_w if is_quantized_weight(k)]
        skip = set(qnames) | {k[: -len("weight")] + "weights_scaling_factor" for k in qnames}
        diffs += _compare_float_tensors(fam, tp, part, rank, mo_w, farm_w, hf, skip=skip)
        if rank == 0:  # quant_algo: AWQ vs GPTQ, DIFFERENCES["w4a16_group_layout"]
            diffs += _compare_config(mo_cfg, farm_cfg, part or "llm", quant_keys=("kv_cache_quant_algo", "group_size"))
        for k in qnames:  # DIFFERENCES["w4a16_group_layout"]
            n_quantized += 1
            p = k[: -len("weight")]
            q, s = farm_w[k], farm_w[p + "weights_scaling_factor"]
            in_f = q.shape[0]
            assert q.dtype == torch.float16 and s.dtype == torch.float16 and tuple(s.shape)[0] == in_f // GROUP
            ints_farm = int_values(q, 4)  # [in, out]
            assert tuple(as_int8(q).shape) == (in_f, ints_farm.shape[1] // 2)
            mq, ms = mo_w[k], mo_w[p + "weights_scaling_factor"]
            ints_mo = unpack_int4(mq.contiguous().view(torch.int8).t().contiguous()).t()  # [out, in]
            if not torch.equal(ints_farm.t(), ints_mo):
                diffs.append(f"{part} rank {rank} {k}: integers differ in "
                             f"{int((ints_farm.t() != ints_mo).sum())} of {ints_mo.numel()}")
            if not torch.equal(s, ms.t().contiguous().half()):
                diffs.append(f"{part} rank {rank} {k}: scales differ")
    assert n_quantized and not diffs, "\n".join(diffs)


def test_every_difference_is_used():
    """The list above is the whole list: each entry is referred to by a comparison."""
    import inspect
    import sys

    src = inspect.getsource(sys.modules[__name__])
    for name in DIFFERENCES:
        assert src.count(f'DIFFERENCES["{name}"]') >= 1, name
