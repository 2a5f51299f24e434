"""T5 / Flan-T5 (and the Flan-T5 LLM of BLIP-2): encoder-decoder, RMS-style
layer norm (no mean, no bias), no attention scaling, relative position bias
(bucketed; computed from block 0's table and shared by every layer), no
biases at all; ReLU MLP (T5) or gated GELU (Flan-T5 / T5 v1.1); tied
embeddings scale the decoder output by d_model**-0.5 before lm_head.

TensorRT-LLM layout (examples/models/core/enc_dec/convert_checkpoint.py):
`encoder/` and `decoder/` checkpoints. Encoder layer i: `attention.{qkv,dense}`,
`attention.rel_attn_table` [heads/tp, num_buckets], `attention_layernorm`,
`mlp.{fc,gate,proj}`, `mlp_layernorm`; decoder layer i: `self_attention.*`
(with its rel_attn_table), `self_attention_layernorm`, `cross_attention.{qkv,dense}`,
`cross_attention_layernorm`, `mlp.*`, `mlp_layernorm`; a top-level
`rel_attn_table` and `lm_head` in the decoder; `transformer.ln_f` in both.
q_scaling is 1/sqrt(head_size), which cancels TensorRT-LLM's 1/sqrt(head_size)
attention scale (T5 has none).
"""

from __future__ import annotations

import math

from ..spec import Variant
from . import _split as S
from .base import (LAYERNORM_POSITION, LAYERNORM_TYPE, MLP_TYPE, EncoderDecoderFamily, OutTensor, encdec_config,
                   first_present, register_family)

def scales_decoder_output(hf: dict) -> bool:
    """Whether the decoder output is scaled by d_model**-0.5 before lm_head:
    T5 with tied embeddings does, Flan-T5 / T5 v1.1 (untied) does not.
    Configs saved by transformers 5 say so in `scale_decoder_outputs`; older
    ones in `tie_word_embeddings` (default true)."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return bool(hf.get("tie_word_embeddings", True))


def gated(hf: dict) -> bool:
    return str(hf.get("feed_forward_proj", "relu")).startswith("gated-")


def activation(hf: dict) -> str:
    ffp = str(hf.get("feed_forward_proj", "relu"))
    # transformers maps "gated-gelu" to the tanh approximation of GELU
    return "gelu_new" if ffp == "gated-gelu" else ffp.split("-")[-1]


@register_family("t5")
class T5(EncoderDecoderFamily):
    title = "T5 / Flan-T5"
    model_types = ("t5",)

    def side_heads(self, config: dict) -> dict[str, int]:
        return {"encoder": int(config["num_heads"]), "decoder": int(config["num_heads"])}

    def _common(self, hf: dict, layers: int) -> dict:
        d = hf["d_kv"]
        return dict(
            num_hidden_layers=layers,
            num_attention_heads=hf["num_heads"],
            num_key_value_heads=hf["num_heads"],
            head_size=d,
            hidden_size=hf["d_model"],
            intermediate_size=hf["d_ff"],
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            vocab_size=hf["vocab_size"],
            position_embedding_type="relative",
            hidden_act=activation(hf),
            max_position_embeddings=hf.get("n_positions", 512),
            has_position_embedding=False,
            layernorm_type=LAYERNORM_TYPE["RmsNorm"],
            layernorm_position=LAYERNORM_POSITION["pre_layernorm"],
            has_attention_qkvo_bias=False,
            has_mlp_bias=False,
            has_model_final_layernorm=True,
            has_embedding_layernorm=False,
            has_embedding_scale=False,
            q_scaling=1.0 / math.sqrt(d),
            mlp_type=MLP_TYPE["GatedMLP" if gated(hf) else "MLP"],
            gated_act=gated(hf),
            relative_attention=True,
            num_buckets=hf.get("relative_attention_num_buckets", 32),
            max_distance=hf.get("relative_attention_max_distance", 128),
            model_type="t5",
        )

    def encoder_config(self, hf: dict, variant: Variant) -> dict:
        return encdec_config("EncoderModel", variant, **self._common(hf, hf["num_layers"]))

    def decoder_config(self, hf: dict, variant: Variant) -> dict:
        return encdec_config(
            "DecoderModel", variant,
            **self._common(hf, hf.get("num_decoder_layers") or hf["num_layers"]),
            rescale_before_lm_head=scales_decoder_output(hf),
            has_lm_head_bias=False,
            encoder_hidden_size=hf["d_model"],
            encoder_num_heads=hf["num_heads"],
            encoder_head_size=hf["d_kv"],
            skip_cross_kv=False,
            use_implicit_relative_attention=False,
            decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
            eos_token_id=hf.get("eos_token_id"),
            bos_token_id=hf.get("bos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    # --------------------------------------------------------------- tensors

    def _embedding(self, names: set[str], side: str) -> str:
        return first_present(names, "shared.weight", f"{side}.embed_tokens.weight",
                             "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

    def _layers(self, hf: dict, names: set[str], variant: Variant, rank: int, side: str, n: int) -> list[OutTensor]:
        tp, heads = variant.tp, hf["num_heads"]
        attn = "attention" if side == "encoder" else "self_attention"
        mlp_idx = 1 if side == "encoder" else 2
        table = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out: list[OutTensor] = []
        for i in range(n):
            s, d = f"{side}.block.{i}.layer.", f"transformer.layers.{i}."
            out.append(OutTensor(d + f"{attn}.qkv.weight", tuple(s + f"0.SelfAttention.{x}.weight" for x in "qkv"),
                                 lambda q, k, v: S.fused_qkv(q, k, v, heads, tp, rank)))
            out.append(OutTensor(d + f"{attn}.dense.weight", (s + "0.SelfAttention.o.weight",), lambda t: S.row(t, tp, rank)))
            out.append(OutTensor(d + f"{attn}.rel_attn_table", (table,), lambda t: S.column(t.t().contiguous(), tp, rank)))
            out.append(OutTensor(d + f"{attn}_layernorm.weight", (s + "0.layer_norm.weight",), lambda t: t))
            if side == "decoder":
                out.append(OutTensor(d + "cross_attention.qkv.weight",
                                     tuple(s + f"1.EncDecAttention.{x}.weight" for x in "qkv"),
                                     lambda q, k, v: S.fused_qkv(q, k, v, heads, tp, rank)))
                out.append(OutTensor(d + "cross_attention.dense.weight", (s + "1.EncDecAttention.o.weight",),
                                     lambda t: S.row(t, tp, rank)))
                out.append(OutTensor(d + "cross_attention_layernorm.weight", (s + "1.layer_norm.weight",), lambda t: t))
            ff = s + f"{mlp_idx}.DenseReluDense."
            # Flan-T5's gated MLP: fc = wi_0 (activated), gate = wi_1
            fc = ff + ("wi_0.weight" if gated(hf) else "wi.weight")
            out.append(OutTensor(d + "mlp.fc.weight", (fc,), lambda t: S.column(t, tp, rank)))
            if gated(hf):
                out.append(OutTensor(d + "mlp.gate.weight", (ff + "wi_1.weight",), lambda t: S.column(t, tp, rank)))
            out.append(OutTensor(d + "mlp.proj.weight", (ff + "wo.weight",), lambda t: S.row(t, tp, rank)))
            out.append(OutTensor(d + "mlp_layernorm.weight", (s + f"{mlp_idx}.layer_norm.weight",), lambda t: t))
        return out

    def encoder_tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        out = [OutTensor("transformer.vocab_embedding.weight", (self._embedding(names, "encoder"),), lambda t: t)]
        out += self._layers(hf, names, variant, rank, "encoder", hf["num_layers"])
        out.append(OutTensor("transformer.ln_f.weight", ("encoder.final_layer_norm.weight",), lambda t: t))
        return out

    def decoder_tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        tp = variant.tp
        emb = self._embedding(names, "decoder")
        out = [OutTensor("transformer.vocab_embedding.weight", (emb,), lambda t: t)]
        out += self._layers(hf, names, variant, rank, "decoder", hf.get("num_decoder_layers") or hf["num_layers"])
        out.append(OutTensor("transformer.ln_f.weight", ("decoder.final_layer_norm.weight",), lambda t: t))
        head = "lm_head.weight" if "lm_head.weight" in names else emb
        out.append(OutTensor("lm_head.weight", (head,), lambda t: S.vocab_rows(t, tp, rank)))
        table = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out.append(OutTensor("rel_attn_table", (table,), lambda t: S.column(t.t().contiguous(), tp, rank)))
        return out
