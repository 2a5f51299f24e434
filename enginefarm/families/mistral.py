"""Mistral (mistralai/Mistral-7B-*): LLaMA's layout and tensors (GQA,
RMSNorm, rotary positions, SiLU-gated MLP) plus sliding-window attention.
TensorRT-LLM builds it with its LLaMA model under the architecture name
MistralForCausalLM; the window is a run-time setting there
(max_attention_window_size), written into config.json per layer under that
name so that the runtime that loads the checkpoint applies it.
"""

from __future__ import annotations

from ..spec import Variant
from .llama import LLaMA
from .base import register_family


@register_family("mistral")
class Mistral(LLaMA):
    title = "Mistral"
    model_types = ("mistral",)
    architecture = "MistralForCausalLM"
    tiny_random_affine = True
    tiny_models = {"mistral": dict(layers=2, hidden=64, heads=8, kv_heads=2, tied=False)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied):
        # a 16-token sliding window, so that it binds within the tests' inputs
        return dict(model_type="mistral", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + 32,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                    max_position_embeddings=256, sliding_window=16, rms_norm_eps=1e-6, bos_token_id=0,
                    eos_token_id=2, pad_token_id=1, initializer_range=0.1, tie_word_embeddings=tied)

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        cfg = super().trtllm_config(hf, variant)
        window = hf.get("sliding_window")
        if window and hf.get("use_sliding_window", True):
            cfg["max_attention_window_size"] = [int(window)] * hf["num_hidden_layers"]
        return cfg
