"""OPT (facebook/opt-*): decoder-only, learned absolute positions (offset 2
in Hugging Face, dropped in the TensorRT-LLM checkpoint), LayerNorm, ReLU MLP."""

from __future__ import annotations

from ..errors import NotAvailable
from ..spec import Variant
from . import _split as S
from .base import DecoderFamily, OutTensor, mapping, quantization, register_family


@register_family("opt")
class OPT(DecoderFamily):
    title = "OPT"
    model_types = ("opt",)
    architecture = "OPTForCausalLM"
    tiny_random_affine = False
    # 8 heads, so that every tp size (1, 2, 4, 8) divides them
    tiny_models = {"opt": dict(layers=2, hidden=64, heads=4, kv_heads=None, tied=True),
                   "opt-h8": dict(layers=2, hidden=64, heads=8, kv_heads=None, tied=True)}

    def tiny_config(self, vocab, layers, hidden, heads, kv_heads, tied):
        return dict(model_type="opt", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                    ffn_dim=hidden * 2, num_attention_heads=heads, max_position_embeddings=256,
                    word_embed_proj_dim=hidden, pad_token_id=1, bos_token_id=2, eos_token_id=2, init_std=0.1,
                    tie_word_embeddings=True)

    def check_config(self, config: dict, variant: Variant, where: str = "config.json") -> None:
        super().check_config(config, variant, where)
        proj = config.get("word_embed_proj_dim", config["hidden_size"])
        if proj != config["hidden_size"]:
            raise NotAvailable(
                f"OPT with word_embed_proj_dim ({proj}) != hidden_size ({config['hidden_size']}) "
                f"(opt-350m's project_in/out) is not supported by the TensorRT-LLM OPT layout ({where})"
            )

    def trtllm_config(self, hf: dict, variant: Variant) -> dict:
        h = hf["hidden_size"]
        return {
            "architecture": self.architecture,
            "dtype": variant.dtype,
            "vocab_size": hf["vocab_size"],
            "hidden_size": h,
            "num_hidden_layers": hf["num_hidden_layers"],
            "num_attention_heads": hf["num_attention_heads"],
            "num_key_value_heads": hf["num_attention_heads"],
            "head_size": h // hf["num_attention_heads"],
            "intermediate_size": hf["ffn_dim"],
            "hidden_act": hf.get("activation_function", "relu"),
            "norm_epsilon": 1e-5,
            "position_embedding_type": "learned_absolute",
            "max_position_embeddings": hf["max_position_embeddings"],
            "do_layer_norm_before": hf.get("do_layer_norm_before", True),
            "bias": hf.get("enable_bias", True),
            "share_embedding_table": False,
            "use_parallel_embedding": False,
            "mapping": mapping(variant.tp),
            "quantization": quantization(variant),
        }

    def tensors(self, hf: dict, names: set[str], variant: Variant, rank: int = 0) -> list[OutTensor]:
        tp = variant.tp
        p = "model.decoder." if "model.decoder.embed_tokens.weight" in names else "decoder."
        n_heads = hf["num_attention_heads"]
        out = [
            OutTensor("transformer.vocab_embedding.weight", (p + "embed_tokens.weight",), lambda t: t),
            OutTensor("transformer.position_embedding.weight", (p + "embed_positions.weight",), lambda t: t[2:]),
        ]
        bias = hf.get("enable_bias", True)
        kinds = ("weight", "bias") if bias else ("weight",)
        for i in range(hf["num_hidden_layers"]):
            s, d = f"{p}layers.{i}.", f"transformer.layers.{i}."
            for k in ("weight", "bias"):
                out.append(OutTensor(d + f"input_layernorm.{k}", (s + f"self_attn_layer_norm.{k}",), lambda t: t))
                out.append(OutTensor(d + f"post_layernorm.{k}", (s + f"final_layer_norm.{k}",), lambda t: t))
            for k in kinds:
                out.append(
                    OutTensor(
                        d + f"attention.qkv.{k}",
                        tuple(s + f"self_attn.{x}_proj.{k}" for x in "qkv"),
                        lambda q, kk, v: S.fused_qkv(q, kk, v, n_heads, tp, rank),
                    )
                )
                out.append(OutTensor(d + f"attention.dense.{k}", (s + f"self_attn.out_proj.{k}",), lambda t: S.row(t, tp, rank)))
                out.append(OutTensor(d + f"mlp.fc.{k}", (s + f"fc1.{k}",), lambda t: S.column(t, tp, rank)))
                out.append(OutTensor(d + f"mlp.proj.{k}", (s + f"fc2.{k}",), lambda t: S.row(t, tp, rank)))
        if hf.get("do_layer_norm_before", True) and p + "final_layer_norm.weight" in names:
            for k in ("weight", "bias"):
                out.append(OutTensor(f"transformer.ln_f.{k}", (p + f"final_layer_norm.{k}",), lambda t: t))
        head = "lm_head.weight" if "lm_head.weight" in names else p + "embed_tokens.weight"
        out.append(OutTensor("lm_head.weight", (head,), lambda t: S.vocab_rows(t, tp, rank)))
        return out
