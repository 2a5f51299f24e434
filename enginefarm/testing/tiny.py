"""Tiny Hugging Face checkpoints, written offline.

Each is random-initialised from a fixed seed and saved with
`save_pretrained` (config.json + model.safetensors) next to a small
byte-level BPE tokenizer trained on the farm's own text set (multimodal
ones: next to their processor, that is the image processor and that
tokenizer with an `<image>` token; BLIP: BlipImageProcessorPil and a BERT
WordPiece tokenizer from a vocab.txt trained on the same text), so tests and
the demo never download anything. `ensure_tiny(name)` writes one once and
afterwards leaves it untouched (its files keep their mtimes, so the fetch
step's cache key stays put).

A decoder-only family declares its tiny checkpoints in its own module
(`tiny_models`, `tiny_config`: enginefarm/families/base.py), so adding a
family adds its fixtures; the encoder-decoder and multimodal ones are here.

    python -m enginefarm.testing.tiny opt /tmp/tiny-opt [--seed 1 --layers 3 ...]
    python -m enginefarm.testing.tiny llava /tmp/tiny-llava [--image-size 48 --patch 12 ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..concurrency import GATE, IMPORTS
from ..families import get_family, tiny_fixtures

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3
VOCAB = 384


def default_root() -> Path:
    return Path(os.environ.get("ENGINEFARM_TINY_DIR", ".farm/tiny"))


def eval_text() -> str:
    return (Path(__file__).resolve().parent.parent / "data" / "eval.txt").read_text()


def make_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(eval_text().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _random_affine(model, std: float = 0.1):
    """Hugging Face initialises biases to 0 and norm weights to 1; random
    ones (from the seeded generator) make every bias and norm parameter
    count, so that a converter dropping or misplacing one is caught."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, std)
            elif p.dim() == 1:  # LayerNorm / RMSNorm weights
                p.normal_(1.0, std)
    return model


def _t5(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool, gated: bool = False):
    """T5 (ReLU MLP, tied embeddings: decoder output scaled) or, gated, a
    Flan-T5-like one (gated GELU, its own lm_head, no scaling, and like
    Flan-T5 an attention width heads x d_kv that differs from d_model).
    Few relative-position buckets and a short max_distance, so short test
    sequences reach T5's logarithmic buckets too."""
    import torch
    from torch import nn
    from transformers import T5Config, T5ForConditionalGeneration

    d_kv = 16 if gated else hidden // heads
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=hidden,
        d_kv=d_kv,
        d_ff=hidden * 2 + 32,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=tied,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,  # T5 starts the decoder from its pad token
        initializer_factor=1.0,
    )
    model = T5ForConditionalGeneration(cfg)
    if not tied:
        # transformers 5 always ties T5's lm_head; an untied checkpoint (as
        # Flan-T5's) keeps both tensors, and says so in config.json
        model.lm_head.weight = nn.Parameter(torch.randn(VOCAB, hidden) * hidden**-0.5)
        model.config.tie_word_embeddings = False
    _settle(model, 1.0 if gated else 4.0)
    return model


def _bart(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool, mbart: bool = False):
    """BART (post-norm) or mBART (pre-norm, final layer norms, scaled embeddings)."""
    from transformers import BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

    config_cls, model_cls = (MBartConfig, MBartForConditionalGeneration) if mbart else (BartConfig, BartForConditionalGeneration)
    cfg = config_cls(
        vocab_size=VOCAB,
        d_model=hidden,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=hidden * 2,
        decoder_ffn_dim=hidden * 2,
        max_position_embeddings=256,
        scale_embedding=mbart,
        init_std=0.1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,  # BART starts the decoder from </s>
        forced_eos_token_id=None,
    )
    model = model_cls(cfg)
    _settle(model, 4.0 if mbart else 1.0)
    return model


def _settle(model, out_scale: float) -> None:
    """Seeded changes that make a random encoder-decoder a sharper test:
    norm weights and biases off their 1 / 0 init (a converter that dropped or
    swapped a norm would otherwise go unnoticed); a smaller shared embedding
    and larger attention / MLP output projections, so that with tied
    embeddings the greedy continuation does not just repeat its last token."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(("SelfAttention.o.weight", "EncDecAttention.o.weight", "DenseReluDense.wo.weight",
                                "out_proj.weight", "fc2.weight")):
                p.mul_(out_scale)
        model.get_input_embeddings().weight.mul_(0.1)


# ----------------------------------------------------------------------------- multimodal

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = VOCAB  # the first id after the trained vocabulary
MM_VOCAB = VOCAB + 16  # the LLM's embedding rows: padded past the image token (as LLaVA's 32000 -> 32064)


def image_tokenizer():
    """The tiny tokenizer plus the image placeholder token, as the LLaVA and
    BLIP-2 processors expect it (one special token, never split)."""
    from tokenizers import AddedToken

    tok = make_tokenizer()
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    return tok


def reinit(model, seed: int, std: float = 0.3) -> None:
    """Seeded weights with some spread: matrices N(0, std), biases N(0, 0.02),
    norm scales 1 + N(0, 0.1). (Hugging Face's own init leaves BLIP-2's vision
    tower near zero, so every image would look alike to the LLM; and with a
    small spread greedy decoding of a random model repeats one token, which
    would prove little.)"""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(r * std)
            elif name.endswith("bias"):
                p.copy_(r * 0.02)
            else:
                p.copy_(1.0 + r * 0.1)


def _blip2(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool, image_size: int,
           patch: int, vision_hidden: int, vision_layers: int, queries: int, t5: bool = False):
    """BLIP-2 with OPT or (t5) with a Flan-T5-like LLM: gated GELU, its own
    lm_head, an attention width (heads x 16) that differs from d_model."""
    import torch
    from torch import nn
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig, T5Config
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
                  num_attention_heads=2, image_size=image_size, patch_size=patch)
    qformer = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=2,
                   num_attention_heads=2, encoder_hidden_size=vision_hidden, cross_attention_frequency=1)
    if t5:
        text = T5Config(vocab_size=MM_VOCAB, d_model=hidden, d_kv=16, d_ff=hidden * 2 + 32, num_layers=layers,
                        num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=tied, pad_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    else:
        text = OPTConfig(vocab_size=MM_VOCAB, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=hidden * 2,
                         num_attention_heads=heads, max_position_embeddings=256, word_embed_proj_dim=hidden,
                         pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                      num_query_tokens=queries, image_token_index=IMAGE_TOKEN_ID)
    model = Blip2ForConditionalGeneration(cfg)
    if not t5:
        reinit(model, seed)
    else:
        # the vision side spread out as for OPT; the T5 keeps Hugging Face's
        # init, settled as the tiny Flan-T5 (T5 does not scale its attention
        # scores, so N(0, 0.3) weights would make its logits ill-conditioned)
        for part in (model.vision_model, model.qformer, model.language_projection):
            reinit(part, seed)
        with torch.no_grad():
            model.query_tokens.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
        _settle(model.language_model, 1.0)
    if t5 and not tied:  # as Flan-T5: an lm_head of its own (transformers 5 ties T5's unless told)
        lm = model.language_model
        lm.lm_head.weight = nn.Parameter(torch.randn(MM_VOCAB, hidden, generator=torch.Generator().manual_seed(seed))
                                         * hidden**-0.5)
        lm.config.tie_word_embeddings = False
        model.config.text_config.tie_word_embeddings = False
        model.config.tie_word_embeddings = False
    proc = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
                          tokenizer=image_tokenizer(), num_query_tokens=queries)
    return model, proc


def _clip_and_llama(layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool, image_size: int,
                    patch: int, vision_hidden: int, vision_layers: int, max_positions: int, llm: str = "llama"):
    """The CLIP vision tower's and the LLM's configs of the tiny LLaVAs
    (llm "mistral": a Mistral with a 24-token sliding window, which the
    image features make bind)."""
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                              num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                              patch_size=patch, projection_dim=vision_hidden)
    config_cls, extra = (MistralConfig, {"sliding_window": 24}) if llm == "mistral" else (LlamaConfig, {})
    text = config_cls(vocab_size=MM_VOCAB, hidden_size=hidden, intermediate_size=hidden * 2 + 32,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=max_positions, rms_norm_eps=1e-6, pad_token_id=1, bos_token_id=0,
                      eos_token_id=2, tie_word_embeddings=tied, **extra)
    return vision, text


def _llava(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool, image_size: int,
           patch: int, vision_hidden: int, vision_layers: int, feature_layer: int = -2):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision, text = _clip_and_llama(layers, hidden, heads, kv_heads, tied, image_size, patch, vision_hidden,
                                   vision_layers, max_positions=256)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN_ID,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=(image_size // patch) ** 2,
                      tie_word_embeddings=tied)
    model = LlavaForConditionalGeneration(cfg)
    reinit(model, seed)
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=image_tokenizer(), patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, proc


def _llava_next(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool, image_size: int,
                patch: int, vision_hidden: int, vision_layers: int, llm: str = "llama"):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    # tiles of image_size; grids of 1 x 2, 2 x 1 and 2 x 2 tiles
    pins = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    vision, text = _clip_and_llama(layers, hidden, heads, kv_heads, tied, image_size, patch, vision_hidden,
                                   vision_layers, max_positions=512, llm=llm)
    cfg = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN_ID,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", image_grid_pinpoints=pins,
                          image_seq_length=(image_size // patch) ** 2, tie_word_embeddings=tied)
    model = LlavaNextForConditionalGeneration(cfg)
    reinit(model, seed)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size}, image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=image_tokenizer(), patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, proc


VIDEO_TOKEN = "<video>"
VIDEO_TOKEN_ID = VOCAB + 1


class _VideoProcessorFiles:
    """The files of a LlavaNextVideoProcessor as save_pretrained writes them
    (transformers cannot build that processor without torchvision, so they
    are written here): the tokenizer with `<image>` and `<video>`, the image
    processor's preprocessor_config.json, the video processor's
    video_preprocessor_config.json (CLIP's steps: resize the shortest edge,
    centre crop, rescale, normalise), processor_config.json."""

    def __init__(self, image_processor, tokenizer, video: dict, processor: dict):
        self.image_processor, self.tokenizer, self.video, self.processor = image_processor, tokenizer, video, processor

    def save_pretrained(self, dest) -> None:
        import json

        self.tokenizer.save_pretrained(dest)
        self.image_processor.save_pretrained(dest)
        (Path(dest) / "video_preprocessor_config.json").write_text(json.dumps(self.video, indent=2) + "\n")
        (Path(dest) / "processor_config.json").write_text(json.dumps(self.processor, indent=2) + "\n")


def _llava_next_video(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool,
                      image_size: int, patch: int, vision_hidden: int, vision_layers: int, llm: str = "llama",
                      pool_mode: str = "average", pool_stride: int = 2):
    from tokenizers import AddedToken
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pins = [[image_size, 2 * image_size], [2 * image_size, image_size]]
    vision, text = _clip_and_llama(layers, hidden, heads, kv_heads, tied, image_size, patch, vision_hidden,
                                   vision_layers, max_positions=512, llm=llm)
    cfg = LlavaNextVideoConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               projector_hidden_act="gelu", image_grid_pinpoints=pins, spatial_pool_mode=pool_mode,
                               spatial_pool_stride=pool_stride, image_seq_length=(image_size // patch) ** 2,
                               tie_word_embeddings=tied)
    model = LlavaNextVideoForConditionalGeneration(cfg)
    reinit(model, seed)
    tok = image_tokenizer()
    tok.add_tokens([AddedToken(VIDEO_TOKEN, special=True, normalized=False)], special_tokens=True)
    assert tok.convert_tokens_to_ids(VIDEO_TOKEN) == VIDEO_TOKEN_ID
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size}, image_grid_pinpoints=pins)
    video = {"video_processor_type": "LlavaNextVideoVideoProcessor", "processor_class": "LlavaNextVideoProcessor",
             "size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
             "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
             "resample": 3, "do_convert_rgb": True, "do_sample_frames": False}
    proc = {"processor_class": "LlavaNextVideoProcessor", "patch_size": patch, "vision_feature_select_strategy": "default",
            "image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN, "num_additional_image_tokens": 1}
    return model, _VideoProcessorFiles(ip, tok, video, proc)


def nougat_tokenizer():
    """The tiny BPE vocabulary and merges in Nougat's own tokenizer class
    (its pre-tokenizer, `<s> ... </s>` template; ids 0..3 as Nougat's)."""
    import json

    from transformers import NougatTokenizer

    model = json.loads(make_tokenizer().backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return NougatTokenizer(vocab=model["vocab"], merges=merges)


def _nougat(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool, image_size: int,
            image_width: int, patch: int, vision_hidden: int, vision_layers: int, window: int = 2):
    """A VisionEncoderDecoderModel as Nougat's: a Donut-Swin encoder of
    `vision_layers` stages (embed_dim vision_hidden, doubling per stage) on
    image_size x image_width pages, an mBART decoder (pre-norm, scaled
    embeddings, final layer norm) cross-attending to it; enc_to_dec_proj where
    the widths differ. Swin's window must stay below every stage's resolution
    (Hugging Face shrinks it otherwise, and its bias table no longer fits)."""
    from transformers import DonutSwinConfig, MBartConfig, NougatProcessor, VisionEncoderDecoderConfig, VisionEncoderDecoderModel
    from transformers.models.nougat.image_processing_pil_nougat import NougatImageProcessorPil

    enc = DonutSwinConfig(image_size=[image_size, image_width], patch_size=patch, embed_dim=vision_hidden,
                          depths=[1] * (vision_layers - 1) + [2], num_heads=[2 ** i for i in range(vision_layers)],
                          window_size=window)
    dec = MBartConfig(vocab_size=VOCAB, d_model=hidden, decoder_layers=layers, decoder_attention_heads=heads,
                      decoder_ffn_dim=hidden * 2, encoder_layers=layers, encoder_attention_heads=heads,
                      max_position_embeddings=256, scale_embedding=True, is_decoder=True, add_cross_attention=True,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                      forced_eos_token_id=None, tie_word_embeddings=tied)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 1, 2
    model = VisionEncoderDecoderModel(cfg)
    reinit(model, seed)
    _settle(model.decoder, 4.0)
    proc = NougatProcessor(image_processor=NougatImageProcessorPil(size={"height": image_size, "width": image_width}),
                           tokenizer=nougat_tokenizer())
    return model, proc


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
BLIP_START = "[DEC]"  # BLIP's decoder start token (text_config.bos_token_id), after the WordPiece vocabulary


def bert_tokenizer(vocab_size: int = 320):
    """A BERT WordPiece tokenizer (lower case, [CLS] ... [SEP]) from a small
    vocab.txt that a WordPiece trainer writes from the farm's own text set,
    plus BLIP's [DEC] as its bos token (as BLIP's tokenizer has it)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(eval_text().splitlines(), vocab_size=vocab_size, min_frequency=1, show_progress=False,
                           special_tokens=BERT_SPECIALS)
    with tempfile.TemporaryDirectory(prefix="tiny-bert-") as d:
        wp.save_model(d)  # vocab.txt, one token a line
        tok = BertTokenizer.from_pretrained(d)
    tok.add_special_tokens({"bos_token": BLIP_START})
    return tok


def _blip(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool, image_size: int,
          patch: int, vision_hidden: int, vision_layers: int):
    """BlipForConditionalGeneration: a ViT of width vision_hidden and a BERT
    text decoder of width `hidden` (the widths differ, as BLIP-large's, so the
    cross-attention keys/values take another width than the decoder's), with
    BlipProcessor (BlipImageProcessorPil + the WordPiece tokenizer above).
    Untied (tied=False): an lm_head and an lm_head bias of their own."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = bert_tokenizer()
    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
                  num_attention_heads=2, image_size=image_size, patch_size=patch)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=tied)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, tie_word_embeddings=tied))
    reinit(model, seed)
    proc = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
                         tokenizer=tok)
    return model, proc


# name -> (builder, defaults): the encoder-decoder and multimodal ones; the
# decoder-only families declare theirs in their own module (tiny_models,
# tiny_config; see _family_builder)
_OWN: dict[str, tuple[Callable, dict]] = {
    # encoder-decoder: T5 (ReLU, tied), a Flan-T5-like one (gated GELU, untied,
    # 6 heads like flan-t5-small: tp 1 and 2), BART (post-norm), mBART (pre-norm)
    "t5": (_t5, dict(layers=2, hidden=64, heads=4, kv_heads=None, tied=True, gated=False)),
    "flan-t5": (_t5, dict(layers=2, hidden=64, heads=6, kv_heads=None, tied=False, gated=True)),
    "bart": (_bart, dict(layers=2, hidden=64, heads=4, kv_heads=None, tied=True, mbart=False)),
    "mbart": (_bart, dict(layers=2, hidden=64, heads=4, kv_heads=None, tied=True, mbart=True)),
    # multimodal: a 32 px image in 8 px patches (16 patches + CLS); BLIP-2 makes
    # 8 query features, LLaVA 16 (CLS dropped, second-to-last CLIP layer)
    "blip2": (_blip2, dict(layers=2, hidden=64, heads=4, kv_heads=None, tied=True, image_size=32, patch=8,
                           vision_hidden=32, vision_layers=2, queries=8)),
    # BLIP-2 with a Flan-T5-like LLM (6 heads of 16, untied): the 8 query features feed the T5 encoder
    "blip2-t5": (_blip2, dict(layers=2, hidden=64, heads=6, kv_heads=None, tied=False, image_size=32, patch=8,
                              vision_hidden=32, vision_layers=2, queries=8, t5=True)),
    "llava": (_llava, dict(layers=2, hidden=64, heads=4, kv_heads=2, tied=False, image_size=32, patch=8,
                           vision_hidden=32, vision_layers=3)),
    # 32 px tiles of 8 px patches (16 features a tile), up to 2 x 2 tiles:
    # 16 + 8 rows x (8 + 1) = 88 features per image at most
    "llava-next": (_llava_next, dict(layers=2, hidden=64, heads=4, kv_heads=2, tied=False, image_size=32, patch=8,
                                     vision_hidden=32, vision_layers=3)),
    # the same with a Mistral LLM (as llava-v1.6-mistral-7b)
    "llava-next-mistral": (_llava_next, dict(layers=2, hidden=64, heads=4, kv_heads=2, tied=False, image_size=32,
                                             patch=8, vision_hidden=32, vision_layers=3, llm="mistral")),
    # LLaVA-NeXT-Video: 32 px frames in 8 px patches, 4 x 4 pooled by 2: 4 features a frame
    "llava-next-video": (_llava_next_video, dict(layers=2, hidden=64, heads=4, kv_heads=2, tied=False, image_size=32,
                                                 patch=8, vision_hidden=32, vision_layers=3, llm="llama",
                                                 pool_mode="average", pool_stride=2)),
    # 64 x 48 pages in 4 px patches, three Swin stages: 4 x 3 = 12 features of
    # width 64 (16 x 2 x 2), the decoder's width (no enc_to_dec_proj)
    "nougat": (_nougat, dict(layers=2, hidden=64, heads=4, kv_heads=None, tied=True, image_size=64, image_width=48,
                             patch=4, vision_hidden=16, vision_layers=3)),
    # BLIP captioning: 32 px images in 8 px patches, 16 + 1 = 17 ViT features of
    # width 32, cross-attended by a BERT decoder of width 64
    "blip": (_blip, dict(layers=2, hidden=64, heads=4, kv_heads=None, tied=True, image_size=32, patch=8,
                         vision_hidden=32, vision_layers=2)),
}


def _family_builder(family: str) -> Callable:
    """The builder of a decoder-only family's tiny checkpoints: its
    tiny_config as a Hugging Face config, the model of that config
    (AutoModelForCausalLM, seeded by write_tiny), and for most families a
    random draw of every bias and norm weight."""

    def build(seed: int, **args):
        from transformers import AutoConfig, AutoModelForCausalLM

        fam = get_family(family)
        fields = dict(fam.tiny_config(VOCAB, **args))
        cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        model = AutoModelForCausalLM.from_config(cfg)
        return _random_affine(model) if fam.tiny_random_affine else model

    return build


def tiny_models() -> dict[str, tuple[Callable, dict]]:
    """Every tiny checkpoint: name -> (builder, default arguments). The
    decoder-only families' come from the family registry (so a new family
    module brings its own), the others from this module."""
    out = {}
    for name, family in tiny_fixtures().items():
        out[name] = (_family_builder(family), dict(get_family(family).tiny_models[name]))
    clash = set(out) & set(_OWN)
    if clash:
        raise RuntimeError(f"tiny checkpoints declared twice: {sorted(clash)}")
    return {**out, **_OWN}


def write_tiny(name: str, dest: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the tiny checkpoint `name` into `dest` (replaced if present)."""
    import torch

    models = tiny_models()
    if name not in models:
        raise KeyError(f"no tiny model {name!r}; known: {', '.join(models)}")
    build, defaults = models[name]
    args = {**defaults, **overrides}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        torch.manual_seed(seed)
        built = build(seed, **args)
        model, processor = built if isinstance(built, tuple) else (built, None)
        model.eval().save_pretrained(tmp, safe_serialization=True)
        # multimodal: the processor (image processor + tokenizer) travels with the checkpoint
        (processor or make_tokenizer()).save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest




def ensure_tiny(name: str, root: str | Path | None = None) -> Path:
    """The tiny checkpoint `name` under root, written on first use only."""
    dest = Path(root or default_root()) / name
    if (dest / "config.json").is_file():
        return dest
    # one writer at a time in a process (the nightly fetches recipes in
    # threads): it imports transformers' classes on first use, and it builds
    # models, which no trace in another thread may see (enginefarm.concurrency)
    with GATE.hold("run", f"tiny:{name}"), IMPORTS:
        if (dest / "config.json").is_file():
            return dest
        return write_tiny(name, dest)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="write a tiny random-initialised HF checkpoint (offline)")
    models = tiny_models()
    ap.add_argument("name", choices=sorted(models))
    ap.add_argument("dest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int, dest="kv_heads")
    mm = ap.add_argument_group("multimodal (blip2, blip2-t5, llava, llava-next, nougat, blip)")
    mm.add_argument("--image-size", type=int, dest="image_size", help="nougat: the page height")
    mm.add_argument("--image-width", type=int, dest="image_width", help="nougat: the page width")
    mm.add_argument("--patch", type=int)
    mm.add_argument("--vision-hidden", type=int, dest="vision_hidden")
    mm.add_argument("--vision-layers", type=int, dest="vision_layers")
    mm.add_argument("--queries", type=int, help="blip2: Q-Former query tokens (visual features per image)")
    mm.add_argument("--llm", choices=["llama", "mistral"], help="llava-next(-video): the language model")
    mm.add_argument("--pool-mode", dest="pool_mode", choices=["average", "max", "conv"], help="llava-next-video")
    mm.add_argument("--pool-stride", dest="pool_stride", type=int, help="llava-next-video")
    a = ap.parse_args(argv)
    keys = ("layers", "hidden", "heads", "kv_heads", "image_size", "image_width", "patch", "vision_hidden",
            "vision_layers", "queries", "llm", "pool_mode", "pool_stride")
    over = {k: v for k, v in vars(a).items() if k in keys and v is not None}
    unknown = set(over) - set(models[a.name][1])
    if unknown:
        ap.error(f"{a.name} takes no {', '.join('--' + k.replace('_', '-') for k in sorted(unknown))}")
    print(write_tiny(a.name, a.dest, seed=a.seed, **over))


if __name__ == "__main__":
    main()
