"""BLIP-2 (Salesforce/blip2-opt-*, blip2-flan-t5-*): a ViT whose patch
embeddings a Q-Former's learned query tokens cross-attend to, then a linear
projection into the LLM's embedding space. One image gives
`num_query_tokens` (32) features, placed before the prompt's tokens.

The LLM is OPT (decoder-only: the features are prompt-table rows of its
input) or Flan-T5 (encoder-decoder: the features are prompt-table rows of the
T5 *encoder's* input, and the decoder cross-attends to the encoder's output;
converted by the t5 family into `encoder/` + `decoder/`)."""

from __future__ import annotations

from ._multimodal import MultimodalFamily
from .base import register_family


def _visual_class():
    import torch
    from torch import nn
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

    class Blip2Visual(nn.Module):
        """pixel_values [B, 3, S, S] -> [B, num_query_tokens, LLM hidden]; the
        attribute names are the checkpoint's, so its tensors load by name."""

        def __init__(self, cfg):
            super().__init__()
            self.vision_model = Blip2VisionModel(cfg.vision_config)
            self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer_config.hidden_size))
            self.qformer = Blip2QFormerModel(cfg.qformer_config)
            self.language_projection = nn.Linear(cfg.qformer_config.hidden_size, cfg.text_config.hidden_size)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            image = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
            queries = self.query_tokens.expand(image.shape[0], -1, -1)
            mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
            # the Q-Former runs in its own dtype (fp32 in half-precision builds, as in Hugging Face)
            out = self.qformer(query_embeds=queries, encoder_hidden_states=image.to(queries.dtype),
                               encoder_attention_mask=mask, return_dict=True).last_hidden_state
            return self.language_projection(out.to(self.language_projection.weight.dtype))

    return Blip2Visual


@register_family("blip2")
class Blip2(MultimodalFamily):
    title = "BLIP-2 (ViT + Q-Former + OPT)"
    model_types = ("blip-2",)
    visual_features = 32  # the released checkpoints' num_query_tokens; a checkpoint's own count wins
    llm_model_types = {"opt": "opt", "t5": "t5"}
    llm_prefixes = (("language_model.", ""),)
    visual_prefixes = (
        ("vision_model.", "vision_model."),
        ("qformer.", "qformer."),
        ("query_tokens", "query_tokens"),
        ("language_projection.", "language_projection."),
    )
    image_placement = "prepend"
    reference_class = "Blip2ForConditionalGeneration"

    def features(self, config: dict) -> int:
        return int(config.get("num_query_tokens") or self.full_config(config).num_query_tokens)

    def visual_module(self, config: dict):
        return _visual_class()(self.full_config(config))

    def cast_visual(self, module, dtype):
        import torch

        module = module.to(dtype)
        module.qformer.to(torch.float32)
        module.query_tokens.data = module.query_tokens.data.float()
        return module

    def reference_features(self, model, encodings):
        import torch

        pixels = torch.cat([e["pixel_values"] for e in encodings])
        return list(model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output)

    def reference_text_logits(self, model, ids):
        return model.language_model(input_ids=ids).logits

    # ----------------------------------------------------------------- Flan-T5: the seq2seq reference

    def decoder_start_token_id(self, config: dict):
        """Flan-T5's decoder start token as the t5 family's conversion writes it: the T5 config's
        decoder_start_token_id, else its pad token (the engines start from it; the reference step generates
        from it)."""
        text = self.llm_config(config)
        return text.get("decoder_start_token_id", text.get("pad_token_id", 0))

    def reference_text_model(self, model):
        """The T5 alone (text in, text out)."""
        return model.language_model

    def reference_seq2seq_logits(self, model, enc, decoder_ids):
        import torch

        return model(**enc, decoder_input_ids=torch.tensor([decoder_ids], device=enc["pixel_values"].device)).logits[0]

    conversational = True

    def chat_lines(self, turns, user: str, token: str) -> str:
        """BLIP-2's question answering with a context, as LAVIS's README
        writes it: "Question: {q} Answer: {a}." per turn, joined by spaces,
        then "Question: {message} Answer:"."""
        return " ".join([f"Question: {u} Answer: {a}." for u, a in turns] + [f"Question: {user} Answer:"])

    def reference_generate(self, model, enc, start: int, n: int, eos, pad, num_beams: int = 1) -> list[int]:
        from transformers import GenerationConfig

        gc = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=num_beams, early_stopping=False,
                              length_penalty=1.0, decoder_start_token_id=start, eos_token_id=eos, pad_token_id=pad)
        # after the decoder's start token
        return self.plain_greedy(model).generate(**enc, generation_config=gc)[0, 1:].tolist()
