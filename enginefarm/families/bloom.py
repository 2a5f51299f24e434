"""BLOOM and BLOOMZ (bigscience/bloom*): ALiBi attention biases instead of
position embeddings, a LayerNorm on the word embeddings, GELU (tanh) MLP,
embeddings tied to the LM head.

query_key_value interleaves q, k, v per head like GPT-NeoX's; TensorRT-LLM's
BloomForCausalLM wants [q; k; v] per rank. ALiBi slopes are not stored: each
rank computes the model's slopes and keeps those of its own heads.
"""

from __future__ import annotations

from ..errors import NotAvailable
from ..spec import Variant
from . import _split as S
from .base import DecoderFamily, OutTensor, hf_value, prefix_of, register_family


@register_family("bloom")
class Bloom(DecoderFamily):
    title = "BLOOM / BLOOMZ"
    model_types = ("bloom",)
    architecture = "BloomForCausalLM"
    # bloom-h6: ALiBi slopes of a head count that is not a power of two
    tiny_models = {"bloom": dict(layers=2, hidden=64, heads=8, kv_heads=None, tied=True),
                   "bloom-h6": dict(layers=2, hidden=48, heads=6, kv_heads=None, tied=True)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied):
        return dict(model_type="bloom", vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1, initializer_range=0.1)
    hidden_keys = ("hidden_size", "n_embed")
    layer_keys = ("n_layer", "num_hidden_layers")
    head_keys = ("n_head", "num_attention_heads")

    def check_config(self, config: dict, variant: Variant, where: str = "config.json") -> None:
        super().check_config(config, variant, where)
        if config.get("apply_residual_connection_post_layernorm"):
            raise NotAvailable(f"BLOOM with apply_residual_connection_post_layernorm (the residual taken after the "
                               f"layernorm) is not supported: TensorRT-LLM's BLOOM adds the residual before it ({where})")

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        h = self.dims(hf)[0]
        return self.base_config(
            variant,
            **self.mha_fields(hf),
            intermediate_size=4 * h,
            # TensorRT-LLM's converter writes "gelu" (its gelu is the tanh form); Hugging
            # Face's bloom_gelu is the tanh form, which is gelu_new
            hidden_act="gelu_new",
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding_type="alibi",
            # ALiBi has no position table; recorded for the runtime's bookkeeping
            max_position_embeddings=hf_value(hf, "seq_length", "max_position_embeddings", default=2048),
        )

    def tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        tp, (_, layers, n) = variant.tp, self.dims(hf)
        p = prefix_of(names, "word_embeddings.weight", ("transformer.", ""))
        out = S.whole("transformer.vocab_embedding", p + "word_embeddings", bias=False)
        out += S.whole("transformer.ln_embed", p + "word_embeddings_layernorm")
        for i in range(layers):
            s, d = f"{p}h.{i}.", f"transformer.layers.{i}."
            out += [
                *S.whole(d + "input_layernorm", s + "input_layernorm"),
                *S.whole(d + "post_layernorm", s + "post_attention_layernorm"),
                *S.fused_qkv_linear(d + "attention.qkv", s + "self_attention.query_key_value",
                                    lambda t: S.per_head_qkv(t, n), n, tp, rank),
                *S.row_linear(d + "attention.dense", s + "self_attention.dense", tp, rank),
                *S.column_linear(d + "mlp.fc", s + "mlp.dense_h_to_4h", tp, rank),
                *S.row_linear(d + "mlp.proj", s + "mlp.dense_4h_to_h", tp, rank),
            ]
        out += S.whole("transformer.ln_f", p + "ln_f")
        return out + S.lm_head(names, ("lm_head", p + "word_embeddings"), tp, rank)
