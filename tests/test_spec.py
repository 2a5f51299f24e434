"""Recipes: parsing, clear errors, derived limits, variants, refs."""

import pytest

from enginefarm.errors import BadInput, NotAvailable
from enginefarm.families import detect_family, get_family
from enginefarm.families import load_recipe
from enginefarm.spec import Variant, parse_recipe, parse_ref

BASE = {"name": "r", "family": "opt", "source": {"tiny": "opt"}}


def test_tiny_recipes_load_and_name_variants():
    r = load_recipe("tiny-opt")
    assert r.family == "opt" and [v.name for v in r.variants()] == ["fp32-tp1"]
    assert r.variant(None).name == "fp32-tp1"


def test_variant_names_follow_the_matrix():
    r = parse_recipe({**BASE, "matrix": {"dtype": ["float16"], "quant": ["none", "w8a16"], "tp": [1, 2],
                                          "backend": ["aoti", "tensorrt-llm"]}}, "x.yaml")
    names = [v.name for v in r.variants()]
    assert "fp16-tp1-aoti" in names and "fp16-w8a16-tp2-tensorrt-llm" in names and len(names) == 8
    with pytest.raises(BadInput, match="no variant 'nope'"):
        r.variant("nope")


def test_bad_recipe_message_names_file_field_and_expectation():
    with pytest.raises(BadInput) as e:
        parse_recipe({**BASE, "limits": {"max_batch_size": "many"}, "matrix": {"tp": [0]}}, "models/x.yaml")
    msg = str(e.value)
    assert "models/x.yaml" in msg
    assert "limits.max_batch_size" in msg and "integer" in msg
    assert "matrix.tp" in msg and "a whole number from 1 to 64" in msg
    # any tp the checkpoint's heads allow: not only powers of two (a 9-head model splits at 3)
    assert [v.tp for v in parse_recipe({**BASE, "matrix": {"tp": [1, 3, 6]}}, "x.yaml").variants()] == [1, 3, 6]


def test_unknown_field_and_unpinned_hf_source():
    with pytest.raises(BadInput, match="matrix.tpp"):
        parse_recipe({**BASE, "matrix": {"tpp": [1]}}, "x.yaml")
    with pytest.raises(BadInput, match="40-hex"):
        parse_recipe({**BASE, "source": {"hf": "facebook/opt-125m", "revision": "main"}}, "x.yaml")


def test_max_multimodal_len_is_derived_and_a_contradiction_names_both(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text(
        "name: b\nfamily: blip2\nsource: {tiny: opt}\ncomponents: {visual: {}, llm: {}}\n"
        "limits: {max_batch_size: 4, max_multimodal_len: 100}\n"
    )
    with pytest.raises(BadInput) as e:
        load_recipe(str(p))
    assert "max_multimodal_len is 100" in str(e.value) and "= 128" in str(e.value)
    p.write_text("name: b\nfamily: blip2\nsource: {tiny: opt}\ncomponents: {visual: {}, llm: {}}\nlimits: {max_batch_size: 4}\n")
    r = load_recipe(str(p))
    assert get_family("blip2").derived_limits(r)["max_multimodal_len"] == 4 * 32


def test_tp_must_divide_heads():
    fam = get_family("llama")
    cfg = {"model_type": "llama", "num_attention_heads": 12, "num_key_value_heads": 4}
    v = lambda tp: Variant(name=f"t{tp}", backend="aoti", dtype="float16", quant="none", tp=tp, target="cpu")
    fam.check_config(cfg, v(1))
    fam.check_config(cfg, v(2))
    fam.check_config(cfg, v(4))
    with pytest.raises(BadInput, match="tp size 8 does not divide the model's 12 attention heads"):
        fam.check_config(cfg, v(8))
    # kv heads replicated when tp exceeds them (2 kv heads, tp 4): allowed
    fam.check_config({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2}, v(4))
    with pytest.raises(BadInput, match="key/value heads"):
        fam.check_config({"model_type": "llama", "num_attention_heads": 12, "num_key_value_heads": 3}, v(2))


def test_a_declared_family_is_refused_naming_what_is_missing(monkeypatch):
    """None is declared today (BLIP was the last); one declared here goes
    through the registry as the catalog's would."""
    from enginefarm import families

    monkeypatch.setitem(families._PLANNED, "whisper", families._planned(
        "whisper", "Whisper speech recognition", ("whisper",), "encoder-decoder", missing="its audio encoder"))
    r = parse_recipe({**BASE, "family": "whisper"}, "x.yaml")
    with pytest.raises(NotAvailable, match=r"family 'whisper' \(Whisper speech recognition\) is not implemented yet: "
                                           r"its audio encoder; nothing is built"):
        get_family("whisper").require_implemented(r)
    assert "blip" in families.implemented_families() and "blip" not in families._PLANNED


def test_detect_family():
    assert detect_family({"model_type": "opt"}) == "opt"
    assert detect_family({"model_type": "llava"}) == "llava"
    with pytest.raises(BadInput, match="pass --family"):
        detect_family({"model_type": "nonsense"})


@pytest.mark.parametrize("bad", ["", "UP", "a/../b", "../x", "/abs", "a:b:c", "a@", "a:..@x"])
def test_bad_refs(bad):
    with pytest.raises(BadInput, match="bad ref"):
        parse_ref(bad)


def test_ref_defaults():
    r = parse_ref("tiny-opt")
    assert (r.recipe, r.variant, r.alias) == ("tiny-opt", None, "latest")
    r = parse_ref("llava-1.5-7b:fp16-tp2@validated")
    assert (r.recipe, r.variant, r.alias) == ("llava-1.5-7b", "fp16-tp2", "validated")


def test_convert_code_version_covers_the_family_modules_it_converts_through():
    """Editing llama.py must re-key Mistral's conversions (Mistral inherits
    LLaMA's) and LLaVA-NeXT's (its LLM converts through llama/mistral)."""
    from enginefarm.families import get_family

    assert "enginefarm.families.llama" in get_family("mistral").code_modules()
    mods = get_family("llava-next").code_modules()
    assert {"enginefarm.families.llama", "enginefarm.families.mistral", "enginefarm.families.llava_next"} <= set(mods)
    assert "enginefarm.families.opt" not in mods
