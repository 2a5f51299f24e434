"""Inputs refused before heavy work, and refs without a variant.

- A checkpoint that lacks what a later step loads (the tokenizer; a
  multimodal model's processor files) exits 2 right after fetch (or at
  `recipe new`), naming the missing files, with nothing converted; such an
  error is never retried.
- `run`, `pull`, `show` and `bench` take the recipe's default variant, as
  the publish manifest recorded it, for a recipe given by path too.
"""

from __future__ import annotations

import json

import pytest

from enginefarm.cli import main as cli
from enginefarm.errors import BadInput
from enginefarm.store import open_store
from enginefarm.tasks.policy import should_retry
from enginefarm.testing import write_tiny
from enginefarm.testing.engines import Variant, publish_synthetic
from helpers import recipe_for


def _steps(store, recipe: str) -> set[str]:
    return {s for _, s, _ in open_store(str(store)).list_manifests(recipe)}


@pytest.mark.parametrize("family,drop,named", [
    ("llava", ("processor_config.json", "preprocessor_config.json"), "image processor"),
    ("opt", ("tokenizer.json", "tokenizer_config.json"), "tokenizer"),
])
def test_a_checkpoint_without_what_validation_loads_exits_2_after_fetch(tmp_path, capsys, family, drop, named):
    src = write_tiny(family, tmp_path / "src", seed=5)
    for name in drop:
        (src / name).unlink(missing_ok=True)
    recipe = recipe_for(tmp_path, f"no-{family}-files", family, src)
    store = tmp_path / "store"
    assert cli(["build", str(recipe), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("enginefarm:")]
    assert len(lines) == 1, err
    assert "<checkpoint>" not in lines[0] and "ef-inputs" not in lines[0]  # no scratch path the user never gave
    assert f"the checkpoint has no usable {named} files" in lines[0]
    assert "expected one of: " in lines[0] and "config.json" in lines[0]  # what it wants, and what it has
    assert _steps(store, f"no-{family}-files") == {"fetch"}  # fetched, checked, nothing converted

    # refused at `recipe new` as well, before a recipe is written
    assert cli(["recipe", "new", "x", "--source", str(src)]) == 2
    err = capsys.readouterr().err
    assert f"has no usable {named} files" in err and "Traceback" not in err


def test_failures_that_a_retry_cannot_fix_are_not_retried():
    missing = OSError("Can't load image processor for '/tmp/x'. If you were trying to load it from ...")
    assert not should_retry("validate", missing)  # "any" step: would retry anything else
    assert not should_retry("validate", FileNotFoundError("/tmp/x/tokenizer.json"))
    assert not should_retry("build", BadInput("bad"))
    assert should_retry("validate", RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert should_retry("fetch", ConnectionError("reset by peer"))


def test_refs_without_a_variant_take_the_default_the_publish_recorded(tmp_path, capsys):
    """A recipe given by path (not in the catalog) with two variants and a
    default_variant: show, pull and run without a variant use that default."""
    store = open_store(str(tmp_path / "store"))
    fields = {"matrix": {"dtype": ["float32"], "tp": [1, 2]}, "default_variant": "fp32-tp2"}
    for tp, seed in ((1, 1), (2, 2)):
        v = Variant(name=f"fp32-tp{tp}", backend="aoti", dtype="float32", quant="none", tp=tp, target="cpu")
        publish_synthetic(store, "by-path", seed=seed, n_files=1, size=256, variant=v, recipe_fields=fields)
    m = store.get_manifest_by_path(store.get_ref("by-path", "fp32-tp1", "latest")[0]["manifest"])
    assert m["results"]["recipe"]["default_variant"] == "fp32-tp2"

    assert cli(["show", "by-path", "--store", store.uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ref"]["variant"] == "fp32-tp2"
    assert cli(["pull", "by-path", "--store", store.uri, "--dest", str(tmp_path / "pulled"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ref"].startswith("by-path:fp32-tp2@latest")
