"""The model catalog: every top-level recipe in models/ loads, is pinned, names
a known family, and together they cover the seed systems the farm builds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from enginefarm.errors import BadInput
from enginefarm.families import all_families
from enginefarm.families import load_recipe

MODELS = Path(__file__).resolve().parent.parent / "models"
PATHS = sorted(p for p in MODELS.glob("*.yaml") if p.is_file())  # top level only: models/tiny/ is fixtures
HEX40 = re.compile(r"^[0-9a-f]{40}$")

# Recipes whose Hugging Face commit sha could not be found in public sources
# offline: they say `track: main` (resolved to a sha at fetch time and recorded
# in the manifest). Keep this list exact: pinning one of them (or unpinning
# another) makes the tests below fail until the list is updated.
TRACKING = {
    "nougat-base",
    "llava-next-video-7b",
    "llava-next-video-34b",
    "cerebras-gpt-111m",
    "cerebras-gpt-256m",
    "cerebras-gpt-1.3b",
    "mbart-large-50",
}

# Hugging Face repos of the seed systems the catalog must cover.
SEEDS = {
    "seed:trtllm-multimodal": [
        "Salesforce/blip2-opt-2.7b",
        "Salesforce/blip2-flan-t5-xl",
        "llava-hf/llava-1.5-7b-hf",
        "llava-hf/llava-1.5-13b-hf",
        "facebook/nougat-base",
        "facebook/nougat-small",
    ],
    "seed:mindie-llava": [
        "llava-hf/llava-v1.6-mistral-7b-hf",
        "llava-hf/llava-v1.6-vicuna-13b-hf",
        "llava-hf/llava-v1.6-34b-hf",
        "llava-hf/LLaVA-NeXT-Video-7B-hf",
        "llava-hf/LLaVA-NeXT-Video-34B-hf",
    ],
    "seed:trt-hf-demo": [
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "EleutherAI/gpt-neo-125m",
        "EleutherAI/gpt-neo-1.3B",
        "EleutherAI/gpt-neo-2.7B",
        "EleutherAI/gpt-neox-20b",
        "EleutherAI/gpt-j-6b",
        "cerebras/Cerebras-GPT-111M",
        "cerebras/Cerebras-GPT-256M",
        "cerebras/Cerebras-GPT-1.3B",
        "facebook/opt-125m",
        "facebook/opt-350m",
        "facebook/opt-1.3b",
        "facebook/opt-2.7b",
        "facebook/opt-6.7b",
        "t5-small",
        "t5-base",
        "t5-large",
        "google/flan-t5-small",
        "google/flan-t5-base",
        "google/flan-t5-large",
        "facebook/bart-base",
        "facebook/bart-large",
        "facebook/bart-large-cnn",
        "facebook/mbart-large-50",
        "bigscience/bloom-560m",
        "bigscience/bloomz-560m",
        "Salesforce/blip-image-captioning-base",
        "Salesforce/blip-image-captioning-large",
    ],
}


def _raw(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a YAML mapping"
    return data


def _ids(paths):
    return [p.stem for p in paths]


def test_catalog_is_not_empty():
    assert len(PATHS) >= 40


def test_tracking_list_names_existing_recipes():
    stems = {p.stem for p in PATHS}
    missing = TRACKING - stems
    assert not missing, f"TRACKING lists recipes that are not in models/: {sorted(missing)}"


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_recipe_loads(path: Path):
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem
    # the default variant exists and is what a plain ref resolves to
    assert recipe.variant(None).name == (recipe.default_variant or recipe.variants()[0].name)


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_hf_sources_are_pinned_or_say_they_track(path: Path):
    source = _raw(path).get("source") or {}
    if "hf" not in source:
        return
    if path.stem in TRACKING:
        assert source.get("track") == "main" and "revision" not in source, f"{path.name}: stale TRACKING entry"
        return
    revision = source.get("revision")
    assert isinstance(revision, str) and HEX40.match(revision), f"{path.name}: revision {revision!r} is not a 40-hex sha"


def test_unpinned_hf_source_is_refused(tmp_path: Path):
    bad = tmp_path / "x.yaml"
    data = _raw(MODELS / "gpt2.yaml")
    data["name"] = "x"
    data["source"] = {"hf": "gpt2", "revision": "main"}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput, match="must be pinned"):
        load_recipe(str(bad))


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_revision_provenance_comment(path: Path):
    first = path.read_text().splitlines()[0]
    want = "# tracks main:" if path.stem in TRACKING else "# revision:"
    assert first.startswith(want), f"{path.name}: first line must say where the revision came from"


def test_names_unique_and_match_file_stem():
    names = [_raw(p).get("name") for p in PATHS]
    for p, n in zip(PATHS, names):
        assert n == p.stem, f"{p.name}: name {n!r} differs from the file stem"
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"duplicate recipe names: {dupes}"


def test_families_are_known():
    known = set(all_families())
    bad = {p.name: _raw(p).get("family") for p in PATHS if _raw(p).get("family") not in known}
    assert not bad, f"unknown families {bad}; known: {sorted(known)}"


def test_seed_tags_are_known():
    for p in PATHS:
        seeds = [t for t in _raw(p).get("tags", []) if t.startswith("seed:")]
        assert seeds, f"{p.name}: no seed:... tag"
        assert set(seeds) <= set(SEEDS), f"{p.name}: unknown seed tags {seeds}"


def test_catalog_covers_the_seeds():
    by_repo: dict[str, list[tuple[str, list[str]]]] = {}
    for p in PATHS:
        data = _raw(p)
        hf = (data.get("source") or {}).get("hf")
        if hf:
            by_repo.setdefault(hf.lower(), []).append((p.stem, data.get("tags", [])))
    missing, untagged = [], []
    for seed, repos in SEEDS.items():
        for repo in repos:
            found = by_repo.get(repo.lower())
            if not found:
                missing.append(repo)
            elif not any(seed in tags for _, tags in found):
                untagged.append(f"{repo} ({seed})")
    assert not missing, f"seed repos with no recipe: {missing}"
    assert not untagged, f"seed repos whose recipe lacks the seed tag: {untagged}"
