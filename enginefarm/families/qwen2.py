"""Qwen2 (Qwen/Qwen2-*, Qwen2.5-*): LLaMA's layout and tensor names (RMSNorm,
GPT-NeoX style rotary positions, SiLU-gated MLP, grouped-query attention,
optionally tied embeddings) with a bias on the q, k and v projections (none on
o_proj).

TensorRT-LLM builds it with its QWen model under the architecture name
Qwen2ForCausalLM, `qwen_type` qwen2 (tensorrt_llm/models/qwen/config.py,
QWenConfig.from_hugging_face: attn_bias true for qwen2, rotary_base from
rope_theta, position_embedding_type rope_gpt_neox); its converter maps
mlp.gate <- up_proj, mlp.fc <- gate_proj, mlp.proj <- down_proj and writes
the q/k/v biases split like their weights into attention.qkv.bias
(tensorrt_llm/models/qwen/utils.py `get_qwen_key_list`, convert.py
`convert_hf_qwen`), which is LLaMA's layout plus that bias.

This module is the whole family: the registry finds it, the runtime reads
its traits (LLaMA's, inherited) by its architecture name, and the tiny
checkpoint and recipe (models/tiny/tiny-qwen2.yaml) come from here.
"""

from __future__ import annotations

from ..errors import NotAvailable
from ..spec import Variant
from . import _split as S
from .base import OutTensor, register_family
from .llama import LLaMA


@register_family("qwen2")
class Qwen2(LLaMA):
    title = "Qwen2"
    model_types = ("qwen2",)
    architecture = "Qwen2ForCausalLM"
    tiny_random_affine = True  # random q/k/v biases, so that a dropped or misplaced one shows
    tiny_models = {"qwen2": dict(layers=2, hidden=64, heads=8, kv_heads=2, tied=False)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied):
        return dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + 32,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                    max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                    initializer_range=0.1, tie_word_embeddings=tied)

    def check_config(self, config: dict, variant: Variant, where: str = "config.json") -> None:
        super().check_config(config, variant, where)
        if config.get("use_sliding_window"):
            raise NotAvailable(f"Qwen2 with use_sliding_window: true is not supported yet ({where})")

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        cfg = super().trtllm_config({**hf, "attention_bias": False, "mlp_bias": False}, variant)
        del cfg["attn_bias"], cfg["mlp_bias"]
        return {**cfg, "qwen_type": "qwen2", "attn_bias": True, "mlp_bias": False, "use_logn_attn": False}

    def tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        # LLaMA's tensors without biases, then the q/k/v biases fused as the weights are
        out = super().tensors({**hf, "attention_bias": False, "mlp_bias": False}, names, variant, rank)
        tp, n_kv = variant.tp, hf.get("num_key_value_heads") or hf["num_attention_heads"]
        for i in range(hf["num_hidden_layers"]):
            s = f"model.layers.{i}.self_attn."
            out.append(OutTensor(f"transformer.layers.{i}.attention.qkv.bias", tuple(s + f"{x}_proj.bias" for x in "qkv"),
                                 lambda q, k, v: S.fused_qkv(q, k, v, n_kv, tp, rank)))
        return out
