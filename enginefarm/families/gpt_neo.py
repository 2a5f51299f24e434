"""GPT-Neo (EleutherAI/gpt-neo-*): GPT-2's layout with separate q/k/v
projections (no bias), no 1/sqrt(head_size) in the attention softmax, and
layers alternating global attention with local attention over the last
`window_size` tokens.

TensorRT-LLM has no GPT-Neo model of its own; the checkpoint takes the
GPTForCausalLM layout it is closest to: q_scaling = 1/sqrt(head_size)
cancels the softmax scale, the missing qkv bias is written as zeros (that
model has biases on every linear), and each layer's attention window is
written as `max_attention_window_size` (None: the whole causal past), the
per-layer list TensorRT-LLM's runtime takes under that name.
"""

from __future__ import annotations

import math

from ..errors import BadInput
from ..spec import Variant
from . import _split as S
from .base import DecoderFamily, OutTensor, hf_value, register_family

def attention_layers(hf: dict) -> list[str]:
    """'global' / 'local' per layer, from attention_layers or its compact
    form attention_types ([[["global", "local"], 12]])."""
    layers = hf.get("attention_layers")
    if not layers:
        layers = [kind for kinds, times in hf.get("attention_types") or [] for _ in range(times) for kind in kinds]
    n = hf_value(hf, "num_layers", "num_hidden_layers")
    if len(layers) != n or set(layers) - {"global", "local"}:
        raise BadInput(f"GPT-Neo config.json: attention layers {layers} do not name 'global' or 'local' for each of "
                       f"the {n} layers")
    return layers


@register_family("gpt-neo")
class GPTNeo(DecoderFamily):
    title = "GPT-Neo"
    model_types = ("gpt_neo",)
    architecture = "GPTForCausalLM"
    tiny_models = {"gpt-neo": dict(layers=2, hidden=64, heads=8, kv_heads=None, tied=True)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied):
        # global and local layers alternate; a window of 16 tokens binds
        # within the tests' 32-token inputs
        return dict(model_type="gpt_neo", vocab_size=vocab, max_position_embeddings=256, hidden_size=hidden,
                    num_layers=layers, num_heads=heads, window_size=16,
                    attention_types=[[["global", "local"], layers // 2]] + ([[["global"], 1]] if layers % 2 else []),
                    intermediate_size=hidden * 2, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                    initializer_range=0.1)
    layer_keys = ("num_layers", "num_hidden_layers")
    head_keys = ("num_heads", "num_attention_heads")

    def check_config(self, config: dict, variant: Variant, where: str = "config.json") -> None:
        super().check_config(config, variant, where)
        attention_layers(config)

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        h, _, n = self.dims(hf)
        window = hf.get("window_size", 256)
        return self.base_config(
            variant,
            **self.mha_fields(hf),
            intermediate_size=hf_value(hf, "intermediate_size", default=4 * h),
            hidden_act=hf.get("activation_function", "gelu_new"),
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding_type="learned_absolute",
            max_position_embeddings=hf["max_position_embeddings"],
            bias=True,
            q_scaling=1.0 / math.sqrt(h // n),
            max_attention_window_size=[window if kind == "local" else None for kind in attention_layers(hf)],
        )

    def tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        tp, (_, layers, n) = variant.tp, self.dims(hf)
        p = "transformer."
        out = S.whole("transformer.vocab_embedding", p + "wte", bias=False)
        out += S.whole("transformer.position_embedding", p + "wpe", bias=False)
        for i in range(layers):
            s, d = f"{p}h.{i}.", f"transformer.layers.{i}."
            a = s + "attn.attention."
            out += [
                *S.whole(d + "input_layernorm", s + "ln_1"),
                *S.whole(d + "post_layernorm", s + "ln_2"),
                *S.separate_qkv_linear(d + "attention.qkv", (a + "q_proj", a + "k_proj", a + "v_proj"), n, tp, rank,
                                       bias=False),
                OutTensor(d + "attention.qkv.bias", (a + "q_proj.weight",), lambda q: q.new_zeros(3 * q.shape[0] // tp)),
                *S.row_linear(d + "attention.dense", a + "out_proj", tp, rank),
                *S.column_linear(d + "mlp.fc", s + "mlp.c_fc", tp, rank),
                *S.row_linear(d + "mlp.proj", s + "mlp.c_proj", tp, rank),
            ]
        return out + S.whole("transformer.ln_f", p + "ln_f") + S.lm_head(names, ("lm_head", p + "wte"), tp, rank)
