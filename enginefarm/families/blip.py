"""BLIP image captioning (Salesforce/blip-image-captioning-*:
BlipForConditionalGeneration): a ViT (`vision_model.`) whose last hidden
state, class token included, is the encoder output that a BERT-style text
decoder (`text_decoder.`, BlipTextLMHeadModel) cross-attends to. A 384 px
image in 16 px patches gives 24 x 24 + 1 = 577 features of the vision width
(ViT-B: 768, ViT-L: 1024; the text decoder is 768 wide in both).

The `visual` component is the ViT (patch + class embeddings, positions,
pre-norm layers, post_layernorm): pixel_values -> [B, 1 + patches, vision width].

The `llm` component is the text decoder, converted here (no other family
has its layers) into TensorRT-LLM's `decoder/` checkpoint layout, as the bart
family writes Nougat's mBART decoder, with what BERT adds recorded in its
config.json (runtime/encdec.py reads those fields):

- post-norm layers (layernorm_position 1): self-attention, cross-attention
  and MLP each followed by residual add + LayerNorm (epsilon 1e-12);
- embeddings: word + learned absolute positions (from 0) + LayerNorm
  (`transformer.ln_embed`), no scale;
- cross-attention whose key/value projections take the vision width
  (encoder_hidden_size; BLIP-large: 1024 against the decoder's 768):
  cross_attention_layout "q_kv", `cross_attention.q` and `cross_attention.kv`
  (keys then values) in place of a fused qkv;
- BERT's prediction head: has_lm_head_transform, `lm_head_transform.dense`,
  the activation (lm_head_transform_act) and `lm_head_transform.layernorm`,
  then `lm_head` with its bias (`cls.predictions.decoder.bias`, or the tied
  `cls.predictions.bias`); lm_head is the word embedding where tied.

TensorRT-LLM's DecoderModel computes none of these, so the llm is built by
the aoti backend only (a recipe asking tensorrt-llm for it is refused).

Generation as Hugging Face's `generate`: the processor's ids are [CLS] prompt
[SEP]; the first becomes [DEC] (text_config.bos_token_id, the decoder start
token recorded in the checkpoint) and the last is dropped, so the prompt's
tokens are a prefix after the start token, and greedy search stops at
text_config.sep_token_id (recorded as the checkpoint's eos_token_id).
Weight-only quantization leaves the cross-attention q / kv and the head
transform in the model dtype (they are not among the quantized linears).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ..errors import BadInput, NotAvailable
from . import _split as S
from ._multimodal import MultimodalFamily
from .base import (LAYERNORM_POSITION, LAYERNORM_TYPE, MLP_TYPE, CheckpointPart, OutTensor, encdec_config,
                   first_present, register_family)

if TYPE_CHECKING:  # pragma: no cover
    from ..spec import Recipe, Variant

TEXT = "text_decoder."
BERT = TEXT + "bert."
HEAD = TEXT + "cls.predictions."
_VISION_KEYS = ("hidden_size", "image_size", "patch_size")
_TEXT_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers")


def _visual_class():
    from torch import nn
    from transformers.models.blip.modeling_blip import BlipVisionModel

    class BlipVisual(nn.Module):
        """pixel_values [B, 3, S, S] -> the ViT's last hidden state [B, 1 + patches, vision width]."""

        def __init__(self, cfg):
            super().__init__()
            self.vision_model = BlipVisionModel(cfg.vision_config)

        def forward(self, pixel_values):
            return self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state

    return BlipVisual


@register_family("blip")
class Blip(MultimodalFamily):
    title = "BLIP image captioning (ViT + BERT-style text decoder)"
    model_types = ("blip",)
    visual_features = 577  # 384 px in 16 px patches, + the class token; a checkpoint's own count wins
    text_model_types = ("blip_text_model",)
    encdec_parts = ("decoder",)
    features_as_encoder_output = True
    visual_prefixes = (("vision_model.", "vision_model."),)
    reference_class = "BlipForConditionalGeneration"

    # ----------------------------------------------------------------- configs

    def _vision(self, config: dict) -> dict:
        v = config.get("vision_config") or {}
        if not set(_VISION_KEYS) <= set(v):
            v = self.full_config(config).vision_config.to_dict()  # a config.json leaves out defaults
        return v

    def _text(self, config: dict, complete: bool = True) -> dict:
        text = config.get("text_config")
        if isinstance(text, dict) and text.get("model_type") not in (None, *self.text_model_types):
            raise NotAvailable(f"family blip: a {text.get('model_type')!r} text decoder is not supported (supported: "
                               f"{', '.join(self.text_model_types)})")
        if not complete and isinstance(text, dict) and set(_TEXT_KEYS) <= set(text):
            return text
        # every default filled in, and encoder_hidden_size = the vision width (BlipConfig sets it)
        return self.full_config(config).text_config.to_dict()

    def text_config(self, config: dict, complete: bool = True) -> dict:
        return self._text(config, complete)

    def llm_config(self, config: dict) -> dict:
        return self._text(config)

    def image_size(self, config: dict) -> int:
        s = self._vision(config)["image_size"]
        if not isinstance(s, int):
            h, w = int(s[0]), int(s[1])
            if h != w:
                raise NotAvailable(f"family blip: a non-square vision tower ({h} x {w}) is not supported")
            s = h
        return int(s)

    def features(self, config: dict) -> int:
        p = self._vision(config)["patch_size"]
        p = p if isinstance(p, int) else int(p[0])
        return (self.image_size(config) // p) ** 2 + 1  # the patches and the class token

    def visual_meta(self, config: dict) -> dict:
        # the features are the ViT's output, of the vision width (which the cross-attention K/V take)
        return {**super().visual_meta(config), "hidden_size": int(self._vision(config)["hidden_size"])}

    # ----------------------------------------------------------------- checks and limits

    def check_recipe(self, recipe: "Recipe") -> None:
        super().check_recipe(recipe)
        if "llm" in recipe.components:
            for v in recipe.variants():
                if recipe.component_backend("llm", v) == "tensorrt-llm":
                    raise BadInput(
                        f"bad recipe {recipe.origin or recipe.name}: variant {v.name}: BLIP's text decoder (post-norm "
                        f"BERT layers, cross-attention keys/values of the vision width, an lm_head behind a dense + "
                        f"GELU + LayerNorm transform) is not a model TensorRT-LLM's DecoderModel computes; build "
                        f"components.llm with the aoti backend")

    def derived_limits(self, recipe: "Recipe", config: Optional[dict] = None) -> dict[str, Any]:
        lim = super().derived_limits(recipe, config)
        if config is not None:
            n = self._text(config, complete=False).get("max_position_embeddings") or \
                self._text(config)["max_position_embeddings"]
            if lim["max_seq_len"] > n:
                raise BadInput(f"bad recipe {recipe.origin or recipe.name}: limits.max_seq_len ({lim['max_seq_len']}) "
                               f"exceeds the text decoder's {n} positions (text_config.max_position_embeddings)")
        return lim

    def head_counts(self, config: dict) -> tuple[int, int]:
        h = int(self._text(config, complete=False)["num_attention_heads"])
        return h, h

    def check_config(self, config: dict, variant: "Variant", where: str = "config.json") -> None:
        mt = config.get("model_type")
        if mt not in self.model_types:
            raise BadInput(f"family {self.name} expects a config.json with model_type in {list(self.model_types)}, "
                           f"got {mt!r} ({where})")
        text = self._text(config, complete=False)
        if text.get("is_decoder") is False:
            raise BadInput(f"family blip: the text model of this checkpoint is not a decoder (is_decoder: false; {where})")
        heads, h = int(text["num_attention_heads"]), int(text["hidden_size"])
        if h % heads:
            raise BadInput(f"family blip: hidden size {h} is not a multiple of the {heads} attention heads ({where})")
        if heads % variant.tp:
            raise BadInput(f"variant {variant.name}: tp size {variant.tp} does not divide the model's {heads} decoder "
                           f"attention heads ({where}, text_config); pick a tp size that divides {heads}")

    # ----------------------------------------------------------------- llm: the text decoder -> decoder/

    def decoder_config(self, hf: dict, variant: "Variant") -> dict:
        t = self._text(hf)
        h, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
        return encdec_config(
            "DecoderModel", variant,
            num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_size=h // heads,
            hidden_size=h,
            intermediate_size=t["intermediate_size"],
            norm_epsilon=t["layer_norm_eps"],
            vocab_size=t["vocab_size"],
            position_embedding_type="learned_absolute",
            hidden_act=t["hidden_act"],
            max_position_embeddings=t["max_position_embeddings"],
            has_position_embedding=True,
            layernorm_type=LAYERNORM_TYPE["LayerNorm"],
            layernorm_position=LAYERNORM_POSITION["post_layernorm"],
            has_attention_qkvo_bias=True,
            has_mlp_bias=True,
            has_model_final_layernorm=False,
            has_embedding_layernorm=True,
            has_embedding_scale=False,
            q_scaling=1.0,
            mlp_type=MLP_TYPE["MLP"],
            gated_act=False,
            relative_attention=False,
            num_buckets=0,
            max_distance=0,
            model_type="blip_text_model",
            rescale_before_lm_head=False,
            has_lm_head_bias=True,
            has_lm_head_transform=True,
            lm_head_transform_act=t["hidden_act"],
            encoder_hidden_size=int(self._vision(hf)["hidden_size"]),
            encoder_num_heads=heads,
            encoder_head_size=h // heads,
            cross_attention_layout="q_kv",
            skip_cross_kv=False,
            use_implicit_relative_attention=False,
            # Hugging Face's generate: [DEC] starts the decoder, [SEP] ends the caption
            decoder_start_token_id=t["bos_token_id"],
            eos_token_id=t["sep_token_id"],
            bos_token_id=t["bos_token_id"],
            pad_token_id=t.get("pad_token_id"),
        )

    def decoder_tensors(self, hf: dict, names: set[str], variant: "Variant", rank: int = 0) -> list[OutTensor]:
        t = self._text(hf)
        tp, heads = variant.tp, int(t["num_attention_heads"])
        if not any(n.startswith(BERT) for n in names):
            raise BadInput(f"family blip: the checkpoint has no text decoder tensors under {BERT!r}")
        same = lambda x: x  # noqa: E731
        e = BERT + "embeddings."
        out = [
            OutTensor("transformer.vocab_embedding.weight", (e + "word_embeddings.weight",), same),
            OutTensor("transformer.position_embedding.weight", (e + "position_embeddings.weight",), same),
        ]
        for k in ("weight", "bias"):
            out.append(OutTensor(f"transformer.ln_embed.{k}", (e + f"LayerNorm.{k}",), same))
        for i in range(int(t["num_hidden_layers"])):
            s, d = f"{BERT}encoder.layer.{i}.", f"transformer.layers.{i}."
            for k in ("weight", "bias"):
                a = s + "attention."
                out.append(OutTensor(d + f"self_attention.qkv.{k}", tuple(a + f"self.{x}.{k}" for x in ("query", "key", "value")),
                                     lambda q, kk, v: S.fused_qkv(q, kk, v, heads, tp, rank)))
                out.append(OutTensor(d + f"self_attention.dense.{k}", (a + f"output.dense.{k}",), lambda x: S.row(x, tp, rank)))
                out.append(OutTensor(d + f"self_attention_layernorm.{k}", (a + f"output.LayerNorm.{k}",), same))
                c = s + "crossattention."
                out.append(OutTensor(d + f"cross_attention.q.{k}", (c + f"self.query.{k}",), lambda x: S.column(x, tp, rank)))
                # keys then values, each of this rank's heads; their input is the vision width
                out.append(OutTensor(d + f"cross_attention.kv.{k}", (c + f"self.key.{k}", c + f"self.value.{k}"),
                                     lambda kk, v: S.cat([S.column(kk, tp, rank), S.column(v, tp, rank)], 0)))
                out.append(OutTensor(d + f"cross_attention.dense.{k}", (c + f"output.dense.{k}",), lambda x: S.row(x, tp, rank)))
                out.append(OutTensor(d + f"cross_attention_layernorm.{k}", (c + f"output.LayerNorm.{k}",), same))
                out.append(OutTensor(d + f"mlp.fc.{k}", (s + f"intermediate.dense.{k}",), lambda x: S.column(x, tp, rank)))
                out.append(OutTensor(d + f"mlp.proj.{k}", (s + f"output.dense.{k}",), lambda x: S.row(x, tp, rank)))
                out.append(OutTensor(d + f"mlp_layernorm.{k}", (s + f"output.LayerNorm.{k}",), same))
        for k in ("weight", "bias"):
            out.append(OutTensor(f"lm_head_transform.dense.{k}", (HEAD + f"transform.dense.{k}",), same))
            out.append(OutTensor(f"lm_head_transform.layernorm.{k}", (HEAD + f"transform.LayerNorm.{k}",), same))
        # tied checkpoints store the word embedding and cls.predictions.bias once
        w = first_present(names, HEAD + "decoder.weight", e + "word_embeddings.weight")
        b = first_present(names, HEAD + "decoder.bias", HEAD + "bias")
        out.append(OutTensor("lm_head.weight", (w,), lambda x: S.vocab_rows(x, tp, rank)))
        out.append(OutTensor("lm_head.bias", (b,), lambda x: S.vocab_rows(x, tp, rank)))
        return out

    def trtllm_config(self, hf: dict, variant: "Variant") -> dict:
        return self.decoder_config(hf, variant)

    def tensors(self, hf: dict, names: set[str], variant: "Variant", rank: int = 0) -> list[OutTensor]:
        return self.decoder_tensors(hf, names, variant, rank)

    def checkpoint_parts(self, hf: dict, names: set[str], variant: "Variant") -> list[CheckpointPart]:
        """The text decoder only, as `decoder/` (the ViT is the visual component)."""
        return [CheckpointPart("decoder", self.decoder_config(hf, variant),
                               lambda rank: self.decoder_tensors(hf, names, variant, rank))]

    # ----------------------------------------------------------------- visual

    def visual_module(self, config: dict):
        self.image_size(config)
        return _visual_class()(self.full_config(config))

    # ----------------------------------------------------------------- at run time

    def encode(self, processor, image, prompt: str, image_token: str):
        """pixel_values, and the prompt's tokens as Hugging Face's generate
        feeds them after [DEC]: the processor's ids without their first
        ([CLS], replaced by [DEC]) and last ([SEP], dropped)."""
        enc = processor(images=[image], text=[prompt], return_tensors="pt")
        enc["prompt_ids"] = enc["input_ids"][0, 1:-1].tolist()
        return enc

    def decoder_start_token_id(self, config: dict) -> Optional[int]:
        """[DEC] (text_config.bos_token_id), as decoder_config records it (the engines start from it; the
        reference step generates from it)."""
        return self._text(config)["bos_token_id"]

    def stop_token_id(self, processor, llm_meta: dict) -> Optional[int]:
        """[SEP] (text_config.sep_token_id), as the decoder checkpoint records it."""
        eos = llm_meta.get("eos_token_id")
        return eos if eos is not None else processor.tokenizer.sep_token_id

    # ----------------------------------------------------------------- the Hugging Face reference (validation)

    def reference_features(self, model, encodings):
        import torch

        pixels = torch.cat([e["pixel_values"] for e in encodings])
        return list(model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state)

    def reference_seq2seq_logits(self, model, enc, decoder_ids):
        import torch

        dev = enc["pixel_values"].device
        return model(pixel_values=enc["pixel_values"], input_ids=torch.tensor([decoder_ids], device=dev)).logits[0]

    def reference_generate(self, model, enc, start: int, n: int, eos, pad, num_beams: int = 1) -> list[int]:
        """BlipForConditionalGeneration.generate on the processor's ids (it
        puts [DEC] first, drops the last id and stops at sep_token_id, with
        the pad token of text_config, itself: `eos` and `pad` are what the
        engines were given); the tokens after the prefix."""
        # generate runs the text decoder's own generate, from its own generation config
        self.plain_greedy(model.text_decoder)
        ids = enc["input_ids"].clone()  # generate writes [DEC] into it
        out = model.generate(pixel_values=enc["pixel_values"], input_ids=ids, attention_mask=enc["attention_mask"],
                             max_new_tokens=n, do_sample=False, num_beams=num_beams, early_stopping=False,
                             length_penalty=1.0)
        return out[0, ids.shape[1] - 1:].tolist()
