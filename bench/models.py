"""Random-weight models of real shapes, made on the device where they run
(nothing of their size travels): LLaMA-7B, CLIP ViT-L/14-336 and
LLaVA-1.5-7B, as Hugging Face modules, plus the farm's in-memory
conversion of their weights to the TensorRT-LLM layout."""

from __future__ import annotations

import contextlib
import os

import torch

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


@contextlib.contextmanager
def default_dtype(dt):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def hf_llama(layers: int | None = None, device: str = "cuda", dtype=torch.float16, seed: int = 0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {**LLAMA_7B, **over}
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        m = LlamaForCausalLM(cfg)
    m.generation_config.eos_token_id = None  # random weights: never stop early
    m.generation_config.pad_token_id = 0
    return m.eval()


def hf_clip_vision(device: str = "cuda", dtype=torch.float16, seed: int = 0, layers: int | None = None):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    kw = dict(CLIP_L_336)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        m = CLIPVisionModel(CLIPVisionConfig(**kw))
    return m.eval()


def llava_config(llm_layers: int | None = None, vision_layers: int | None = None, image_token_index: int = 32000):
    """LLaVA-1.5-7B's config (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336, LLaMA-7B, vocab 32064."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tk = dict(LLAMA_7B, vocab_size=32064)
    if llm_layers is not None:
        tk["num_hidden_layers"] = llm_layers
    vk = dict(CLIP_L_336)
    if vision_layers is not None:
        vk["num_hidden_layers"] = vision_layers
    return LlavaConfig(vision_config=CLIPVisionConfig(**vk), text_config=LlamaConfig(**tk, pad_token_id=0),
                       image_token_index=image_token_index, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def llava_processor(dest=None):
    """A processor for llava_config's model: the tiny LLaVA fixture's
    (CLIP image processor + the tiny tokenizer with <image>, whose id is
    enginefarm.testing.tiny.IMAGE_TOKEN_ID) at CLIP-L/14-336's sizes: 336 px
    crops in 14 px patches, so 24 x 24 = 576 placeholders per image (CLS
    dropped), the count the llava family reads from config.json. Saved into
    dest when given."""
    from transformers import AutoProcessor

    from enginefarm.testing.tiny import ensure_tiny

    proc = AutoProcessor.from_pretrained(ensure_tiny("llava"))
    proc.patch_size = 14
    proc.image_processor.size = {"shortest_edge": CLIP_L_336["image_size"]}
    proc.image_processor.crop_size = {"height": CLIP_L_336["image_size"], "width": CLIP_L_336["image_size"]}
    if dest is not None:
        proc.save_pretrained(dest)
    return proc


def hf_llava(device: str = "cuda", dtype=torch.float16, seed: int = 0, llm_layers: int | None = None,
             vision_layers: int | None = None, attn: str | None = None, image_token_index: int = 32000):
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(llm_layers, vision_layers, image_token_index)
    if attn:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        m = LlavaForConditionalGeneration(cfg)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m.eval()


def decoder_from_hf(hf_config: dict, state: dict, quant: str = "none", dtype: str = "float16",
                    group_size: int | None = None):
    """A DecoderLM (tp 1) from a Hugging Face LLaMA state dict, through the
    farm's conversion (and weight-only quantization) in memory."""
    from enginefarm.checkpoint import convert_in_memory
    from enginefarm.families import get_family
    from enginefarm.runtime.decoder import DecoderConfig, DecoderLM
    from enginefarm.spec import Variant

    v = Variant(name="bench", backend="aoti", dtype=dtype, quant=quant, tp=1, target="sm_90", group_size=group_size)
    cfg, W = convert_in_memory(get_family("llama"), hf_config, state, v)
    return DecoderLM(DecoderConfig.from_trtllm(cfg), W).eval()


def llama_state(hf_model, prefix: str = "model.") -> dict:
    """A LLaMA state dict under the plain names the family maps
    (model.layers..., lm_head.weight), from LlamaForCausalLM or LLaVA's language model."""
    sd = hf_model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("language_model.model."):
            out["model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            out[k[len("language_model."):]] = v
        elif k.startswith("model.") or k.startswith("lm_head."):
            out[k] = v
    return out


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every parameter except the embedding
    table (one row of it is read), counted from an engine-form DecoderLM."""
    n = 0
    for name, p in model.named_parameters():
        if name == "embed":
            continue
        n += p.numel() * p.element_size()
    return n


def write_shaped(kind: str, dest: str) -> None:
    """A random fp16 checkpoint of a real shape, written on the GPU into dest
    with what the farm's fetch needs beside it: `llama` (LLaMA-7B, the tiny
    llama fixture's tokenizer: its ids fit the 7B vocabulary) or `llava`
    (LLaVA-1.5-7B, llava_processor's 336 px processor: 576 placeholders an
    image, checked). bench/gpu_product.sh runs it as `python3 -m bench.models KIND DIR`."""
    import shutil
    import time

    from enginefarm.testing.tiny import IMAGE_TOKEN_ID, ensure_tiny

    t = time.time()
    # SHAPED_LAYERS / SHAPED_DEVICE / SHAPED_DTYPE: fewer layers at the same widths, on the CPU (a dry run here);
    # SHAPED_LLM_LAYERS: LLaVA's language model alone (its whole CLIP, for the visual engine's figures)
    layers = int(os.environ["SHAPED_LAYERS"]) if os.environ.get("SHAPED_LAYERS") else None
    llm_layers = int(os.environ["SHAPED_LLM_LAYERS"]) if os.environ.get("SHAPED_LLM_LAYERS") else layers
    device = os.environ.get("SHAPED_DEVICE", "cuda")
    dtype = getattr(torch, os.environ.get("SHAPED_DTYPE", "float16"))
    if kind == "llama":
        m = hf_llama(layers=layers, device=device, dtype=dtype)
    elif kind == "llava":
        # the tiny fixture's tokenizer writes <image> as IMAGE_TOKEN_ID (a row of the 32064-row embedding):
        # the config names that id, where enginefarm/families/_multimodal.py image_token_id reads it
        m = hf_llava(device=device, dtype=dtype, image_token_index=IMAGE_TOKEN_ID, llm_layers=llm_layers,
                     vision_layers=layers)
    else:
        raise SystemExit(f"write_shaped: unknown kind {kind!r} (llama or llava)")
    m.generation_config.eos_token_id = 2
    m.save_pretrained(dest, safe_serialization=True, max_shard_size="5GB")
    if kind == "llama":
        for f in ensure_tiny("llama").iterdir():
            if "token" in f.name or f.name == "special_tokens_map.json":
                shutil.copy(f, dest)
    else:
        from enginefarm.images import builtin_image

        proc = llava_processor(dest)
        n = proc(images=[builtin_image("gradient")], text=["<image>\nhi"], return_tensors="pt")
        assert int((n["input_ids"] == IMAGE_TOKEN_ID).sum()) == 576 and tuple(n["pixel_values"].shape[-2:]) == (336, 336)
    print("checkpoint written", round(time.time() - t, 1), "s")


if __name__ == "__main__":
    import sys

    write_shaped(sys.argv[1], sys.argv[2])
