"""LLaMA (and the LLMs of LLaVA): decoder-only, RMSNorm, rotary positions
(GPT-NeoX style halves), SiLU-gated MLP, grouped-query attention, optionally
tied embeddings."""

from __future__ import annotations

from ..spec import Variant
from . import _split as S
from .base import DecoderFamily, DecoderTraits, OutTensor, mapping, quantization, register_family


@register_family("llama")
class LLaMA(DecoderFamily):
    title = "LLaMA"
    model_types = ("llama",)
    architecture = "LlamaForCausalLM"
    traits = DecoderTraits(norm="rmsnorm", gated_mlp=True)
    tiny_random_affine = False
    # llama-h8: 8 heads, so that every tp size (1, 2, 4, 8) divides them, and
    # 2 kv heads (GQA), which tp 4 and 8 replicate
    tiny_models = {"llama": dict(layers=2, hidden=64, heads=4, kv_heads=2, tied=False),
                   "llama-tied": dict(layers=2, hidden=48, heads=6, kv_heads=3, tied=True),
                   "llama-h8": dict(layers=2, hidden=64, heads=8, kv_heads=2, tied=False)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied):
        return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + 32,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                    max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    initializer_range=0.1, tie_word_embeddings=tied)

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        h, n = hf["hidden_size"], hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        return {
            "architecture": self.architecture,
            "dtype": variant.dtype,
            "vocab_size": hf["vocab_size"],
            "hidden_size": h,
            "num_hidden_layers": hf["num_hidden_layers"],
            "num_attention_heads": n,
            "num_key_value_heads": hf.get("num_key_value_heads") or n,
            "head_size": hf.get("head_dim") or h // n,
            "intermediate_size": hf["intermediate_size"],
            "hidden_act": hf.get("hidden_act", "silu"),
            "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            "rotary_scaling": hf.get("rope_scaling"),
            "max_position_embeddings": hf["max_position_embeddings"],
            "attn_bias": bool(hf.get("attention_bias", False)),
            "mlp_bias": bool(hf.get("mlp_bias", False)),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "share_embedding_table": False,
            "use_parallel_embedding": False,
            "mapping": mapping(variant.tp),
            "quantization": quantization(variant),
        }

    def check_config(self, config: dict, variant: Variant, where: str = "config.json") -> None:
        super().check_config(config, variant, where)
        if config.get("rope_scaling"):
            from ..errors import NotAvailable

            raise NotAvailable(f"LLaMA with rope_scaling {config['rope_scaling']} is not supported yet ({where})")

    def tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        tp = variant.tp
        n_kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        out = [OutTensor("transformer.vocab_embedding.weight", ("model.embed_tokens.weight",), lambda t: t)]
        attn_b = ("weight", "bias") if hf.get("attention_bias") else ("weight",)
        mlp_b = ("weight", "bias") if hf.get("mlp_bias") else ("weight",)
        for i in range(hf["num_hidden_layers"]):
            s, d = f"model.layers.{i}.", f"transformer.layers.{i}."
            out.append(OutTensor(d + "input_layernorm.weight", (s + "input_layernorm.weight",), lambda t: t))
            out.append(OutTensor(d + "post_layernorm.weight", (s + "post_attention_layernorm.weight",), lambda t: t))
            for k in attn_b:
                out.append(
                    OutTensor(
                        d + f"attention.qkv.{k}",
                        tuple(s + f"self_attn.{x}_proj.{k}" for x in "qkv"),
                        lambda q, kk, v: S.fused_qkv(q, kk, v, n_kv, tp, rank),
                    )
                )
            out.append(OutTensor(d + "attention.dense.weight", (s + "self_attn.o_proj.weight",), lambda t: S.row(t, tp, rank)))
            if "bias" in attn_b:
                out.append(OutTensor(d + "attention.dense.bias", (s + "self_attn.o_proj.bias",), lambda t: t))
            # TensorRT-LLM's gated MLP: fc = gate_proj (activated), gate = up_proj, proj = down_proj
            for k in mlp_b:
                out.append(OutTensor(d + f"mlp.fc.{k}", (s + f"mlp.gate_proj.{k}",), lambda t: S.column(t, tp, rank)))
                out.append(OutTensor(d + f"mlp.gate.{k}", (s + f"mlp.up_proj.{k}",), lambda t: S.column(t, tp, rank)))
                out.append(OutTensor(d + f"mlp.proj.{k}", (s + f"mlp.down_proj.{k}",), lambda t: S.row(t, tp, rank)))
        out.append(OutTensor("transformer.ln_f.weight", ("model.norm.weight",), lambda t: t))
        head = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
        out.append(OutTensor("lm_head.weight", (head,), lambda t: S.vocab_rows(t, tp, rank)))
        return out
