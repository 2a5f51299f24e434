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
from ..spec import Recipe, read_recipe
from .base import Family

IMPLEMENTED = ("opt", "llama", "gpt2", "gpt-neo", "gpt-neox", "gptj", "bloom", "mistral", "t5", "bart",
               "blip2", "llava", "llava-next", "llava-next-video", "nougat", "blip")


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


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe read and parsed (spec.read_recipe), then cross-checked against
    its family (limits, components) before any heavy work."""
    recipe = read_recipe(name_or_path)
    get_family(recipe.family, origin=recipe.origin).check_recipe(recipe)
    return recipe
