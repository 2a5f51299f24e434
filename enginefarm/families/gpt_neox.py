"""GPT-NeoX and Pythia (EleutherAI/gpt-neox-20b, pythia-*): rotary positions
on the first rotary_pct of each head (GPT-NeoX style halves), LayerNorm, and
by default the parallel residual x + attn(ln1 x) + mlp(ln2 x).

Hugging Face's query_key_value interleaves q, k, v per head
([q0; k0; v0; q1; ...]); TensorRT-LLM's GPTNeoXForCausalLM wants [q; k; v]
with each rank's heads together, so the rows are reordered, then split.
That model's second norm is named post_attention_layernorm.
"""

from __future__ import annotations

from ..errors import NotAvailable
from ..spec import Variant
from . import _split as S
from .base import DecoderFamily, DecoderTraits, OutTensor, hf_value, register_family

def rope_of(hf: dict) -> tuple[float, float]:
    """(rotary_pct, rotary base): older config.json files name them
    rotary_pct / rotary_emb_base, newer ones keep them in rope_parameters."""
    rp = hf.get("rope_parameters") or {}
    pct = hf_value(hf, "rotary_pct", "partial_rotary_factor", default=rp.get("partial_rotary_factor", 0.25))
    base = hf_value(hf, "rotary_emb_base", "rope_theta", default=rp.get("rope_theta", 10000.0))
    return float(pct), float(base)


@register_family("gpt-neox")
class GPTNeoX(DecoderFamily):
    title = "GPT-NeoX / Pythia"
    model_types = ("gpt_neox",)
    architecture = "GPTNeoXForCausalLM"
    traits = DecoderTraits(parallel_residual=True)  # unless config.json says use_parallel_residual: false
    # gpt-neox-seq: the sequential residual (use_parallel_residual: false)
    tiny_models = {"gpt-neox": dict(layers=2, hidden=64, heads=8, kv_heads=None, tied=False),
                   "gpt-neox-seq": dict(layers=2, hidden=64, heads=8, kv_heads=None, tied=True,
                                        parallel_residual=False)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied, parallel_residual=True):
        return dict(model_type="gpt_neox", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=256,
                    rotary_pct=0.5, use_parallel_residual=parallel_residual, bos_token_id=0, eos_token_id=2,
                    pad_token_id=1, initializer_range=0.1, tie_word_embeddings=tied)

    def check_config(self, config: dict, variant: Variant, where: str = "config.json") -> None:
        super().check_config(config, variant, where)
        scaling = config.get("rope_scaling") or {
            k: v for k, v in (config.get("rope_parameters") or {}).items()
            if k == "rope_type" and v != "default"
        }
        if scaling:
            raise NotAvailable(f"GPT-NeoX with rope scaling {scaling} is not supported yet ({where})")
        self.refuse_for_tensorrt_llm(
            variant, "the sequential residual (use_parallel_residual: false)"
            if config.get("use_parallel_residual", True) is False else None, where)
        self.refuse_for_tensorrt_llm(
            variant, "attention_bias: false" if config.get("attention_bias", True) is False else None, where)

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        h = self.dims(hf)[0]
        pct, base = rope_of(hf)
        return self.base_config(
            variant,
            **self.mha_fields(hf),
            intermediate_size=hf_value(hf, "intermediate_size", default=4 * h),
            hidden_act=hf.get("hidden_act", "gelu"),
            norm_epsilon=hf.get("layer_norm_eps", 1e-5),
            position_embedding_type="rope_gpt_neox",
            rotary_pct=pct,
            rotary_emb_base=base,
            max_position_embeddings=hf["max_position_embeddings"],
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
        )

    def tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        tp, (_, layers, n) = variant.tp, self.dims(hf)
        bias = hf.get("attention_bias", True)
        out = S.whole("transformer.vocab_embedding", "gpt_neox.embed_in", bias=False)
        for i in range(layers):
            s, d = f"gpt_neox.layers.{i}.", f"transformer.layers.{i}."
            out += [
                *S.whole(d + "input_layernorm", s + "input_layernorm"),
                *S.whole(d + "post_attention_layernorm", s + "post_attention_layernorm"),
                *S.fused_qkv_linear(d + "attention.qkv", s + "attention.query_key_value",
                                    lambda t: S.per_head_qkv(t, n), n, tp, rank, bias=bias),
                *S.row_linear(d + "attention.dense", s + "attention.dense", tp, rank, bias=bias),
                *S.column_linear(d + "mlp.fc", s + "mlp.dense_h_to_4h", tp, rank),
                *S.row_linear(d + "mlp.proj", s + "mlp.dense_4h_to_h", tp, rank),
            ]
        out += S.whole("transformer.ln_f", "gpt_neox.final_layer_norm")
        return out + S.lm_head(names, ("embed_out", "gpt_neox.embed_in"), tp, rank)
