"""Nougat (facebook/nougat-*): a VisionEncoderDecoderModel whose encoder is a
Donut-Swin vision transformer and whose decoder is an mBART decoder that
cross-attends to the encoder's output. There is no text encoder: the visual
features ARE the encoder output. A 896 x 672 page in 4 px patches, merged
three times (2 x 2 each), gives 28 x 21 = 588 features.

The `visual` component is the Swin encoder (plus `enc_to_dec_proj`, which
Hugging Face adds where the encoder's width differs from the decoder's). The
`llm` component is the mBART decoder only, converted by the bart family (its
tensors live under `decoder.model.decoder.` and `decoder.lm_head.`) into
TensorRT-LLM's `decoder/` checkpoint, with cross-attention; the aoti backend
builds it as a cross-attention K/V package (features in) and the decoder step.

A prompt is the decoder's prefix after its start token ("" for a plain
transcription of the page)."""

from __future__ import annotations

import math

from ..errors import BadInput, NotAvailable
from ._multimodal import MultimodalFamily
from .base import register_family


def _visual_class():
    from torch import nn
    from transformers import AutoModel

    class NougatVisual(nn.Module):
        """pixel_values [B, 3, H, W] -> encoder output [B, F, decoder hidden]."""

        def __init__(self, cfg):
            super().__init__()
            self.encoder = AutoModel.from_config(cfg.encoder)
            self.enc_to_dec_proj = (nn.Linear(cfg.encoder.hidden_size, cfg.decoder.hidden_size)
                                    if _projects(cfg) else None)

        def forward(self, pixel_values):
            out = self.encoder(pixel_values=pixel_values, return_dict=True).last_hidden_state
            return self.enc_to_dec_proj(out) if self.enc_to_dec_proj is not None else out

    return NougatVisual


def _projects(cfg) -> bool:
    """Hugging Face's rule (VisionEncoderDecoderModel): a projection when the
    widths differ and the decoder does not cross-attend at the encoder's width."""
    return (cfg.encoder.hidden_size != cfg.decoder.hidden_size
            and getattr(cfg.decoder, "cross_attention_hidden_size", None) is None)


@register_family("nougat")
class Nougat(MultimodalFamily):
    title = "Nougat (Donut-Swin + mBART decoder)"
    model_types = ("vision-encoder-decoder", "nougat")
    visual_features = 588  # 896 x 672 pages; a checkpoint's own count wins
    text_key = "decoder"
    llm_model_types = {"mbart": "bart"}
    llm_prefixes = (("decoder.model.decoder.", "model.decoder."), ("decoder.lm_head.", "lm_head."))
    encdec_parts = ("decoder",)
    features_as_encoder_output = True
    visual_prefixes = (("encoder.", "encoder."), ("enc_to_dec_proj.", "enc_to_dec_proj."))
    reference_class = "VisionEncoderDecoderModel"
    vision_model_types = ("donut-swin",)

    def _encoder(self, config: dict) -> dict:
        enc = config.get("encoder") or {}
        if not {"model_type", "image_size", "patch_size", "depths"} <= set(enc):
            enc = self.full_config(config).encoder.to_dict()  # an older config.json leaves out defaults
        if enc.get("model_type") not in self.vision_model_types:
            raise NotAvailable(f"family nougat: a {enc.get('model_type')!r} encoder is not supported (supported: "
                               f"{', '.join(self.vision_model_types)})")
        return enc

    def image_size(self, config: dict):
        s = self._encoder(config)["image_size"]
        h, w = (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
        return h if h == w else [h, w]

    def features(self, config: dict) -> int:
        enc = self._encoder(config)
        s = self.image_size(config)
        h, w = (s, s) if isinstance(s, int) else s
        # patches (the image padded to whole patches), then each merge halves them, rounding up (Swin pads)
        h, w = math.ceil(h / enc["patch_size"]), math.ceil(w / enc["patch_size"])
        for _ in range(len(enc["depths"]) - 1):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h * w

    def llm_config(self, config: dict) -> dict:
        # the mBART decoder's config: its cross-attention has the decoder's heads
        # (the encoder_* fields of a decoder-only mBART config describe no encoder)
        text = self.text_config(config)
        if not text.get("add_cross_attention", True):
            raise BadInput("family nougat: the decoder of this checkpoint has no cross-attention (add_cross_attention)")
        return {**text, "encoder_attention_heads": text["decoder_attention_heads"]}

    def head_counts(self, config: dict) -> tuple[int, int]:
        return self.llm_family(config).head_counts(self.llm_config(config))

    def check_config(self, config: dict, variant, where: str = "config.json") -> None:
        mt = config.get("model_type")
        if mt not in self.model_types:
            raise BadInput(f"family {self.name} expects a config.json with model_type in {list(self.model_types)}, "
                           f"got {mt!r} ({where})")
        self._encoder(config)
        llm, text = self.llm_family(config), self.llm_config(config)
        llm.check_model_type(text, f"{where}, decoder")
        heads = llm.side_heads(text)["decoder"]  # no text encoder: the decoder's heads are all that tp splits
        if heads % variant.tp:
            raise BadInput(f"variant {variant.name}: tp size {variant.tp} does not divide the model's {heads} decoder "
                           f"attention heads ({where}, decoder); pick a tp size that divides {heads}")

    def visual_module(self, config: dict):
        self._encoder(config)
        return _visual_class()(self.full_config(config))

    def encode(self, processor, image, prompt: str, image_token: str):
        """pixel_values of the page, and the prompt's tokens (no special
        tokens: the decoder starts from its start token)."""
        enc = processor(images=[image], return_tensors="pt")
        enc["prompt_ids"] = processor.tokenizer(prompt, add_special_tokens=False).input_ids
        return enc

    def reference_features(self, model, encodings):
        import torch

        pixels = torch.cat([e["pixel_values"] for e in encodings])
        out = model.encoder(pixel_values=pixels, return_dict=True).last_hidden_state
        if getattr(model, "enc_to_dec_proj", None) is not None:
            out = model.enc_to_dec_proj(out)
        return list(out)

    def decoder_start_token_id(self, config: dict):
        """The decoder start token as the bart family's conversion writes it: the mBART decoder config's (the
        engines start from it; the reference step generates from it)."""
        return self.llm_config(config).get("decoder_start_token_id")

    def reference_seq2seq_logits(self, model, enc, decoder_ids):
        import torch

        pixels = enc["pixel_values"]
        return model(pixel_values=pixels, decoder_input_ids=torch.tensor([decoder_ids], device=pixels.device)).logits[0]

    def reference_generate(self, model, enc, start: int, n: int, eos, pad, num_beams: int = 1) -> list[int]:
        import torch
        from transformers import GenerationConfig

        prefix = [start] + list(enc["prompt_ids"])
        gc = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=num_beams, early_stopping=False,
                              length_penalty=1.0, decoder_start_token_id=start, eos_token_id=eos, pad_token_id=pad)
        pixels = enc["pixel_values"]
        out = self.plain_greedy(model).generate(pixel_values=pixels, generation_config=gc,
                                                decoder_input_ids=torch.tensor([prefix], device=pixels.device))
        return out[0, len(prefix):].tolist()
