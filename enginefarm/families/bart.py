"""BART and mBART (and the mBART decoder of Nougat): encoder-decoder,
LayerNorm with bias, learned absolute positions (offset 2 in Hugging Face,
dropped in the TensorRT-LLM checkpoint), a layer norm on the embeddings,
optional sqrt(d_model) embedding scale, GELU MLP, biases everywhere.
BART is post-norm with no final layer norm; mBART is pre-norm with a final
layer norm in the encoder and in the decoder. lm_head is tied to the shared
embedding; `final_logits_bias` becomes lm_head's bias.

TensorRT-LLM layout (examples/models/core/enc_dec/convert_checkpoint.py):
`encoder/` and `decoder/` checkpoints with `transformer.vocab_embedding`,
`transformer.position_embedding` (rows 2: of HF's table), `transformer.ln_embed`;
per layer `attention.{qkv,dense}` + `attention_layernorm` (encoder) or
`self_attention.*` + `self_attention_layernorm` and `cross_attention.*` +
`cross_attention_layernorm` (decoder), `mlp.{fc,proj}` + `mlp_layernorm`;
`transformer.ln_f` where the model has a final layer norm; `lm_head` in the decoder.
"""

from __future__ import annotations

from ..spec import Variant
from . import _split as S
from .base import (LAYERNORM_POSITION, LAYERNORM_TYPE, MLP_TYPE, EncoderDecoderFamily, OutTensor, encdec_config,
                   first_present, register_family)

POSITION_OFFSET = 2  # Hugging Face's BartLearnedPositionalEmbedding / MBart's


@register_family("bart")
class BART(EncoderDecoderFamily):
    title = "BART / mBART"
    model_types = ("bart", "mbart")

    def side_heads(self, config: dict) -> dict[str, int]:
        return {"encoder": int(config["encoder_attention_heads"]), "decoder": int(config["decoder_attention_heads"])}

    @staticmethod
    def pre_norm(hf: dict) -> bool:
        return hf.get("model_type") == "mbart"

    def _common(self, hf: dict, side: str) -> dict:
        heads, h = hf[f"{side}_attention_heads"], hf["d_model"]
        pre = self.pre_norm(hf)
        return dict(
            num_hidden_layers=hf[f"{side}_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_size=h // heads,
            hidden_size=h,
            intermediate_size=hf[f"{side}_ffn_dim"],
            norm_epsilon=1e-5,
            vocab_size=hf["vocab_size"],
            position_embedding_type="learned_absolute",
            hidden_act=hf.get("activation_function", "gelu"),
            max_position_embeddings=hf["max_position_embeddings"],
            has_position_embedding=True,
            layernorm_type=LAYERNORM_TYPE["LayerNorm"],
            layernorm_position=LAYERNORM_POSITION["pre_layernorm" if pre else "post_layernorm"],
            has_attention_qkvo_bias=True,
            has_mlp_bias=True,
            has_model_final_layernorm=pre,
            has_embedding_layernorm=True,
            has_embedding_scale=bool(hf.get("scale_embedding", False)),
            q_scaling=1.0,
            mlp_type=MLP_TYPE["MLP"],
            gated_act=False,
            relative_attention=False,
            num_buckets=0,
            max_distance=0,
            model_type="bart",
        )

    def encoder_config(self, hf: dict, variant: Variant) -> dict:
        return encdec_config("EncoderModel", variant, **self._common(hf, "encoder"))

    def decoder_config(self, hf: dict, variant: Variant) -> dict:
        return encdec_config(
            "DecoderModel", variant, **self._common(hf, "decoder"),
            rescale_before_lm_head=False,
            has_lm_head_bias=True,
            encoder_hidden_size=hf["d_model"],
            encoder_num_heads=hf["encoder_attention_heads"],
            encoder_head_size=hf["d_model"] // hf["encoder_attention_heads"],
            skip_cross_kv=False,
            use_implicit_relative_attention=False,
            decoder_start_token_id=hf.get("decoder_start_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            bos_token_id=hf.get("bos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    # --------------------------------------------------------------- tensors

    def _side(self, hf: dict, names: set[str], variant: Variant, rank: int, side: str) -> list[OutTensor]:
        tp, heads = variant.tp, hf[f"{side}_attention_heads"]
        p = f"model.{side}."
        emb = first_present(names, "model.shared.weight", p + "embed_tokens.weight")
        out = [
            OutTensor("transformer.vocab_embedding.weight", (emb,), lambda t: t),
            OutTensor("transformer.position_embedding.weight", (p + "embed_positions.weight",),
                      lambda t: t[POSITION_OFFSET:]),
        ]
        for k in ("weight", "bias"):
            out.append(OutTensor(f"transformer.ln_embed.{k}", (p + f"layernorm_embedding.{k}",), lambda t: t))
        attns = [("self_attn", "attention" if side == "encoder" else "self_attention")]
        if side == "decoder":
            attns.append(("encoder_attn", "cross_attention"))
        for i in range(hf[f"{side}_layers"]):
            s, d = f"{p}layers.{i}.", f"transformer.layers.{i}."
            for src, dst in attns:
                for k in ("weight", "bias"):
                    out.append(OutTensor(d + f"{dst}.qkv.{k}", tuple(s + f"{src}.{x}_proj.{k}" for x in "qkv"),
                                         lambda q, kk, v: S.fused_qkv(q, kk, v, heads, tp, rank)))
                    out.append(OutTensor(d + f"{dst}.dense.{k}", (s + f"{src}.out_proj.{k}",),
                                         lambda t: S.row(t, tp, rank)))
                    out.append(OutTensor(d + f"{dst}_layernorm.{k}", (s + f"{src}_layer_norm.{k}",), lambda t: t))
            for k in ("weight", "bias"):
                out.append(OutTensor(d + f"mlp.fc.{k}", (s + f"fc1.{k}",), lambda t: S.column(t, tp, rank)))
                out.append(OutTensor(d + f"mlp.proj.{k}", (s + f"fc2.{k}",), lambda t: S.row(t, tp, rank)))
                out.append(OutTensor(d + f"mlp_layernorm.{k}", (s + f"final_layer_norm.{k}",), lambda t: t))
        if self.pre_norm(hf):
            for k in ("weight", "bias"):
                out.append(OutTensor(f"transformer.ln_f.{k}", (p + f"layer_norm.{k}",), lambda t: t))
        if side == "decoder":
            head = "lm_head.weight" if "lm_head.weight" in names else emb
            out.append(OutTensor("lm_head.weight", (head,), lambda t: S.vocab_rows(t, tp, rank)))
            # BartForConditionalGeneration's final_logits_bias buffer (zeros where a checkpoint lacks it)
            if "final_logits_bias" in names:
                out.append(OutTensor("lm_head.bias", ("final_logits_bias",),
                                     lambda t: S.vocab_rows(t.reshape(-1), tp, rank)))
            else:
                out.append(OutTensor("lm_head.bias", (head,), lambda t: S.vocab_rows(t.new_zeros(t.shape[0]), tp, rank)))
        return out

    def encoder_tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        return self._side(hf, names, variant, rank, "encoder")

    def decoder_tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        return self._side(hf, names, variant, rank, "decoder")
