"""GPT-J (EleutherAI/gpt-j-6b): attention and MLP in parallel off one
LayerNorm, rotary positions on the first rotary_dim dims of each head in
GPT-J's interleaved pairs (rope_gptj), no bias on q/k/v and the attention
output, an LM head with a bias.

TensorRT-LLM's GPTJForCausalLM adds the attention and MLP partial sums of
a rank before one all-reduce, so mlp.proj's bias is written on rank 0 only
(zeros elsewhere) to be added once.
"""

from __future__ import annotations

from ..spec import Variant
from . import _split as S
from .base import DecoderFamily, DecoderTraits, OutTensor, hf_value, register_family


@register_family("gptj")
class GPTJ(DecoderFamily):
    title = "GPT-J"
    model_types = ("gptj",)
    architecture = "GPTJForCausalLM"
    # attention and MLP read one layernorm, and TensorRT-LLM adds their
    # row-parallel partial sums before one all-reduce (so mlp.proj's bias
    # sits on rank 0 only)
    traits = DecoderTraits(parallel_residual=True, allreduce_once=True)
    tiny_models = {"gptj": dict(layers=2, hidden=64, heads=8, kv_heads=None, tied=False)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied):
        return dict(model_type="gptj", vocab_size=vocab, n_positions=256, n_embd=hidden, n_layer=layers, n_head=heads,
                    rotary_dim=(hidden // heads) // 2, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                    initializer_range=0.1, tie_word_embeddings=False)
    hidden_keys = ("n_embd", "hidden_size")
    layer_keys = ("n_layer", "num_hidden_layers")
    head_keys = ("n_head", "num_attention_heads")

    def check_config(self, config: dict, variant: Variant, where: str = "config.json") -> None:
        super().check_config(config, variant, where)
        h, inner = self.dims(config)[0], config.get("n_inner")
        self.refuse_for_tensorrt_llm(
            variant, f"an MLP of n_inner {inner} (its GPT-J MLP is 4 x {h} wide)" if inner and inner != 4 * h else None,
            where)

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        h, _, n = self.dims(hf)
        return self.base_config(
            variant,
            **self.mha_fields(hf),
            intermediate_size=hf_value(hf, "n_inner", default=4 * h),
            # TensorRT-LLM's converter writes "gelu"; its "gelu" and "gelu_new" are one
            # function, and gelu_new is what Hugging Face's GPT-J computes
            hidden_act=hf.get("activation_function", "gelu_new"),
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding_type="rope_gptj",
            rotary_dim=hf_value(hf, "rotary_dim", default=h // n),
            max_position_embeddings=hf_value(hf, "n_positions", "max_position_embeddings"),
        )

    def tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        tp, (_, layers, n) = variant.tp, self.dims(hf)
        out = S.whole("transformer.vocab_embedding", "transformer.wte", bias=False)
        for i in range(layers):
            s, d = f"transformer.h.{i}.", f"transformer.layers.{i}."
            out += [
                *S.whole(d + "input_layernorm", s + "ln_1"),
                *S.separate_qkv_linear(d + "attention.qkv", tuple(s + f"attn.{x}_proj" for x in "qkv"), n, tp, rank,
                                       bias=False),
                *S.row_linear(d + "attention.dense", s + "attn.out_proj", tp, rank, bias=False),
                *S.column_linear(d + "mlp.fc", s + "mlp.fc_in", tp, rank),
                *S.row_linear(d + "mlp.proj", s + "mlp.fc_out", tp, rank, bias_on_first_rank=True),
            ]
        out += S.whole("transformer.ln_f", "transformer.ln_f")
        return out + S.lm_head(names, ("lm_head",), tp, rank, bias=True)
