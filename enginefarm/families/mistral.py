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


class Mistral(LLaMA):
    name = "mistral"
    title = "Mistral"
    model_types = ("mistral",)
    architecture = "MistralForCausalLM"

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        cfg = super().trtllm_config(hf, variant)
        window = hf.get("sliding_window")
        if window and hf.get("use_sliding_window", True):
            cfg["max_attention_window_size"] = [int(window)] * hf["num_hidden_layers"]
        return cfg


FAMILY = Mistral()
