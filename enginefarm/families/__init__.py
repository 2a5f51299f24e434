"""The family registry.

Implemented families live in their own module (`opt.py`, `llama.py`, ...;
a family name's hyphens are underscores there: gpt-neo -> `gpt_neo.py`)
and export `FAMILY`. Families the catalog names but that are not implemented
yet are declared here with the facts the recipe checks need (components,
visual features); building one says so clearly and builds nothing.
"""

from __future__ import annotations

import importlib
from typing import Optional

from ..errors import BadInput
from .base import Family

IMPLEMENTED = ("opt", "llama", "gpt2", "gpt-neo", "gpt-neox", "gptj", "bloom", "mistral", "t5", "bart",
               "blip2", "llava", "llava-next", "llava-next-video", "nougat")


def _planned(name: str, title: str, model_types: tuple, kind: str, components=("llm",), visual_features=None,
             missing: str = "") -> Family:
    f = Family()
    f.name, f.title, f.model_types, f.kind = name, title, model_types, kind
    f.components, f.visual_features, f.missing = tuple(components), visual_features, missing
    return f


_PLANNED = {
    f.name: f
    for f in [
        # BLIP captioning, what is missing (the rest is there: the ViT visual
        # component is like BLIP-2's without the Q-Former; its 577 features are
        # the decoder's encoder output, as Nougat's; a prompt is the decoder's
        # prefix, as Nougat's, after [DEC] = text_config.bos_token_id, stopping
        # at [SEP]): (1) a conversion of BlipTextLMHeadModel's BERT layers
        # (bert.encoder.layer.N.{attention,crossattention}.{self.query/key/value,
        # output.dense, output.LayerNorm}, intermediate.dense, output.*) to the
        # decoder/ checkpoint; (2) in runtime/encdec.py, cross-attention whose
        # key/value projections take the vision width (BLIP-large: 1024 vs 768,
        # so not one fused qkv) and the lm_head transform (dense + GELU +
        # LayerNorm before the vocab projection and its bias); (3) an offline
        # BERT WordPiece tokenizer for the tiny BlipProcessor.
        _planned("blip", "BLIP image captioning", ("blip",), "multimodal", ("visual", "llm"), 577,
                 missing="its text decoder is a BERT-style decoder (post-norm layers with cross-attention whose "
                         "keys/values take the vision width, and an lm_head behind a dense + GELU + LayerNorm "
                         "transform) that neither the bart/t5 conversion nor the encoder-decoder runtime covers yet"),
    ]
}


def get_family(name: str, origin: Optional[str] = None) -> Family:
    if name in IMPLEMENTED:
        return importlib.import_module(f".{name.replace('-', '_')}", __name__).FAMILY
    if name in _PLANNED:
        return _PLANNED[name]
    where = f"bad recipe {origin}: family: " if origin else ""
    raise BadInput(f"{where}unknown family {name!r}; known families: {', '.join(all_families())}")


def all_families() -> list[str]:
    return list(IMPLEMENTED) + list(_PLANNED)


def implemented_families() -> list[str]:
    return list(IMPLEMENTED)


def detect_family(config: dict) -> str:
    """The family whose model types include config.json's model_type."""
    mt = config.get("model_type")
    for name in all_families():
        if mt in get_family(name).model_types:
            return name
    raise BadInput(
        f"cannot tell the family of a checkpoint with model_type {mt!r}; pass --family (known: {', '.join(all_families())})"
    )
