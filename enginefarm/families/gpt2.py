"""GPT-2 (openai-community/gpt2*) and Cerebras-GPT: decoder-only, learned
absolute positions, pre-LayerNorm, GELU MLP, embeddings tied to the LM head.

Hugging Face keeps GPT-2's projections as Conv1D, weights [in, out]: they
are transposed to the [out, in] of a linear layer. c_attn's output is
[q; k; v] (each hidden wide), so after the transpose each rank takes its
heads of q, k and v. TensorRT-LLM builds it as GPTForCausalLM (gpt_variant gpt2).
"""

from __future__ import annotations

import math

from ..errors import NotAvailable
from ..spec import Variant
from . import _split as S
from .base import DecoderFamily, OutTensor, hf_value, prefix_of, register_family


@register_family("gpt2")
class GPT2(DecoderFamily):
    title = "GPT-2 (and Cerebras-GPT)"
    model_types = ("gpt2",)
    architecture = "GPTForCausalLM"
    tiny_models = {"gpt2": dict(layers=2, hidden=64, heads=8, kv_heads=None, tied=True)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied):
        return dict(model_type="gpt2", vocab_size=vocab, n_positions=256, n_embd=hidden, n_layer=layers, n_head=heads,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1, initializer_range=0.1)
    hidden_keys = ("n_embd", "hidden_size")
    layer_keys = ("n_layer", "num_hidden_layers")
    head_keys = ("n_head", "num_attention_heads")

    def check_config(self, config: dict, variant: Variant, where: str = "config.json") -> None:
        super().check_config(config, variant, where)
        if config.get("scale_attn_by_inverse_layer_idx"):
            raise NotAvailable(f"GPT-2 with scale_attn_by_inverse_layer_idx (a per-layer attention scale) is not "
                               f"supported: TensorRT-LLM's GPT model has one q_scaling for all layers ({where})")
        if config.get("add_cross_attention"):
            raise NotAvailable(f"GPT-2 with cross-attention layers is not a decoder-only model ({where})")

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        h, _, n = self.dims(hf)
        return self.base_config(
            variant,
            gpt_variant="gpt2",
            **self.mha_fields(hf),
            intermediate_size=hf_value(hf, "n_inner", default=4 * h),
            hidden_act=hf.get("activation_function", "gelu_new"),
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding_type="learned_absolute",
            max_position_embeddings=hf_value(hf, "n_positions", "max_position_embeddings"),
            bias=True,
            # scale_attn_weights false: no 1/sqrt(head_size) in the softmax
            q_scaling=1.0 if hf.get("scale_attn_weights", True) else 1.0 / math.sqrt(h // n),
        )

    def tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        tp, (_, layers, n) = variant.tp, self.dims(hf)
        p = prefix_of(names, "wte.weight", ("transformer.", ""))
        out = S.whole("transformer.vocab_embedding", p + "wte", bias=False)
        out += S.whole("transformer.position_embedding", p + "wpe", bias=False)
        for i in range(layers):
            s, d = f"{p}h.{i}.", f"transformer.layers.{i}."
            out += [
                *S.whole(d + "input_layernorm", s + "ln_1"),
                *S.whole(d + "post_layernorm", s + "ln_2"),
                *S.fused_qkv_linear(d + "attention.qkv", s + "attn.c_attn", S.stacked_qkv, n, tp, rank, transposed=True),
                *S.row_linear(d + "attention.dense", s + "attn.c_proj", tp, rank, transposed=True),
                *S.column_linear(d + "mlp.fc", s + "mlp.c_fc", tp, rank, transposed=True),
                *S.row_linear(d + "mlp.proj", s + "mlp.c_proj", tp, rank, transposed=True),
            ]
        return out + S.whole("transformer.ln_f", p + "ln_f") + S.lm_head(names, ("lm_head", p + "wte"), tp, rank)
