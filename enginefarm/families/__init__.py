"""The family registry.

A family is one module of this package (`opt.py`, `gptj.py`, ...) whose
class declares itself with `@register_family("NAME")` (families/base.py).
The package finds its modules itself (every module whose name does not
start with `_`, base.py aside), so adding a family edits no list: a
decoder-only family's module holds its conversion, its TensorRT-LLM
architecture and what that means for the runtime (`traits`), and its tiny
test checkpoints (`tiny_models`, `tiny_config`); its tiny recipe is
models/tiny/tiny-NAME.yaml.

Families the catalog names but that are not implemented yet are declared
here with the facts the recipe checks need (components, visual features);
building one says so clearly and builds nothing.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Optional

from ..errors import BadInput
from ..spec import Recipe, read_recipe
from .base import REGISTRY, DecoderFamily, DecoderTraits, Family, register_family

__all__ = ["DecoderTraits", "Family", "all_families", "decoder_families", "decoder_traits", "detect_family",
           "get_family", "implemented_families", "load_recipe", "register_family", "tiny_fixtures"]


def _planned(name: str, title: str, model_types: tuple, kind: str, components=("llm",), visual_features=None,
             missing: str = "") -> Family:
    f = Family()
    f.name, f.title, f.model_types, f.kind = name, title, model_types, kind
    f.components, f.visual_features, f.missing = tuple(components), visual_features, missing
    return f


# Declared families: the catalog may name them before they are implemented;
# each is `_planned(name, title, model_types, kind, components,
# visual_features, missing=...)`, `missing` saying what its implementation
# lacks. None is declared now (BLIP, the last one, is implemented: blip.py).
_PLANNED: dict[str, Family] = {}

_FOUND = False
_LOCK = threading.RLock()


def _discover() -> dict[str, Family]:
    """Import every family module of this package once (each registers its
    class as it is imported); the registry, after."""
    global _FOUND
    if not _FOUND:
        with _LOCK:  # the nightly looks families up from threads
            if not _FOUND:
                for m in pkgutil.iter_modules(__path__):
                    if not m.name.startswith("_") and m.name != "base":
                        importlib.import_module(f".{m.name}", __name__)
                _FOUND = True
    return REGISTRY


def get_family(name: str, origin: Optional[str] = None) -> Family:
    got = _discover().get(name) or _PLANNED.get(name)
    if got is not None:
        return got
    where = f"bad recipe {origin}: family: " if origin else ""
    raise BadInput(f"{where}unknown family {name!r}; known families: {', '.join(all_families())}")


def implemented_families() -> list[str]:
    return sorted(_discover())


def all_families() -> list[str]:
    return implemented_families() + sorted(_PLANNED)


def decoder_families() -> list[str]:
    """The decoder-only text families (no encoder, no visual component)."""
    return [n for n, f in sorted(_discover().items()) if isinstance(f, DecoderFamily) and f.kind == "decoder"]


def decoder_traits(architecture: str) -> DecoderTraits:
    """What a TensorRT-LLM checkpoint's architecture means for the runtime's
    decoder: the traits of the decoder-only families that convert into it
    (GPT-2 and GPT-Neo share GPTForCausalLM; they must agree)."""
    found = {f.traits for f in map(get_family, decoder_families()) if f.architecture == architecture}
    if not found:
        archs = sorted({get_family(n).architecture for n in decoder_families()})
        raise ValueError(f"the aoti decoder does not know architecture {architecture} (known: {', '.join(archs)})")
    if len(found) > 1:
        raise ValueError(f"the families converting into {architecture} declare different traits: {found}")
    return found.pop()


def tiny_fixtures() -> dict[str, str]:
    """Tiny checkpoint name -> the decoder-only family that declares it."""
    return {tiny: n for n in decoder_families() for tiny in get_family(n).tiny_models}


def detect_family(config: dict) -> str:
    """The family whose model types include config.json's model_type."""
    mt = config.get("model_type")
    for name in all_families():
        if mt in get_family(name).model_types:
            return name
    raise BadInput(
        f"cannot tell the family of a checkpoint with model_type {mt!r}; pass --family (known: {', '.join(all_families())})"
    )


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe read and parsed (spec.read_recipe), then cross-checked against
    its family (limits, components) before any heavy work."""
    recipe = read_recipe(name_or_path)
    get_family(recipe.family, origin=recipe.origin).check_recipe(recipe)
    return recipe
