"""Multimodal systems whose language model is an encoder-decoder: Nougat
(Donut-Swin encoder; its features ARE the encoder output of an mBART decoder)
and BLIP-2 with Flan-T5 (the Q-Former's features are prompt-table rows of the
T5 encoder's input), end to end on Prefect's ephemeral API: fetch, convert
(the bart / t5 family's conversion under the checkpoint's name prefixes),
the visual export, aoti engines, validation against Hugging Face `generate`,
publish, and `enginefarm run` with images.

Each tiny recipe is built once per session (aoti compiles are the cost):
Nougat's with an aoti visual engine (a Swin on non-square pages), BLIP-2's
(whose aoti visual engine tests/test_multimodal.py builds) and the
checkpoints of other sizes with onnxruntime ones, so they cost the two LLM
packages' compiles only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from enginefarm.cli import main as cli
from enginefarm.errors import BadInput
from enginefarm.families import get_family
from enginefarm.images import write_image
from enginefarm.spec import Variant
from enginefarm.store import open_store
from enginefarm.testing import write_tiny
from helpers import build_bf16_beside, count_loads, only_manifest, session_builds, stored_fetch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {"nougat": ["", "The build"], "blip2-t5": ["Question: what is in the picture? Answer:", "a photo of"]}
FEATURES = {"nougat": 12, "blip2-t5": 8}
SEED = {"nougat": 0, "blip2-t5": 0}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """family -> the tiny recipe built once into its own store."""
    return session_builds(tmp_path_factory, lambda family: SEED[family], lambda family: {} if family == "nougat" else {"components": {"visual": {"backend": "onnxruntime"}, "llm": {}}})


manifest = only_manifest


def hf_generate(src: Path, image, prompt: str, n: int, num_beams: int = 1) -> list[int]:
    """Hugging Face's own answer, from its processor and model classes
    (Nougat: the prompt's tokens follow the decoder start token)."""
    import transformers

    proc = transformers.AutoProcessor.from_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    tok = proc.tokenizer
    if cfg["model_type"] == "vision-encoder-decoder":
        model = transformers.VisionEncoderDecoderModel.from_pretrained(src, dtype=torch.float32).eval()
        start = model.config.decoder_start_token_id
        prefix = [start] + tok(prompt, add_special_tokens=False).input_ids
        kw = dict(pixel_values=proc(images=[image], return_tensors="pt")["pixel_values"],
                  decoder_input_ids=torch.tensor([prefix]))
    else:
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
        start = model.config.text_config.decoder_start_token_id
        prefix = [start]
        kw = dict(proc(images=[image], text=[prompt], return_tensors="pt"))
    gc = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=num_beams, early_stopping=False,
                                       length_penalty=1.0, decoder_start_token_id=start,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # plain greedy search, as the engines run it: no forced EOS at the length limit (mBART's default)
    model.generation_config.forced_eos_token_id = None
    with torch.no_grad():
        out = model.generate(**kw, generation_config=gc)
    return out[0, len(prefix):].tolist()


def test_beam_search_with_images_equals_hf_generate(built, tmp_path, capsys):
    """Beams through the encoder-decoder engine whose encoder takes a prompt
    table (BLIP-2 with Flan-T5), as `generate` runs them with num_beams 2."""
    from PIL import Image

    b = built("blip2-t5")
    img = write_image("rings", tmp_path / "r.png", size=40)
    capsys.readouterr()
    for p in PROMPTS["blip2-t5"]:
        assert cli(["run", b.name, "--store", str(b.store), "--image", str(img), "--prompt", p,
                    "--max-new-tokens", "8", "--num-beams", "2", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
        assert got == hf_generate(b.src, Image.open(img).convert("RGB"), p, 8, num_beams=2)


# ----------------------------------------------------------------------------- the tiny recipes, built once


@pytest.mark.parametrize("family", ["nougat", "blip2-t5"])
def test_build_converts_exports_and_validates_against_hf(built, family):
    b = built(family)
    v = b.variant
    assert v["validation"] is True, v["gates"]
    assert {"fetch", "convert", "export", "build.visual", "build.llm", "validate", "publish"} == set(v["steps"])
    visual = "visual/visual.pt2" if family == "nougat" else "visual/visual.onnx"
    assert {visual, "llm/encoder.pt2", "llm/decoder.pt2", "llm/engine.json"} <= set(v["files"])

    # the converted LLM: the decoder only for Nougat (its encoder is the visual component)
    conv = manifest(b.store, b.name, "convert")["files"]
    assert {"decoder/config.json", "decoder/rank0.safetensors"} <= set(conv)
    assert any(f.startswith("encoder/") for f in conv) == (family == "blip2-t5")

    ex = manifest(b.store, b.name, "export")["results"]
    assert ex["features"] == FEATURES[family] and ex["hidden_size"] == 64
    assert ex["image_size"] == ([64, 48] if family == "nougat" else 32)  # Nougat's pages are not square
    assert ex["ort_max_abs_diff"] < 1e-3

    # the Hugging Face side: the reference step's (tests below: reused by another variant)
    ref = manifest(b.store, b.name, "reference")
    assert manifest(b.store, b.name, "validate")["inputs"]["reference"]["key"] == ref["key"]
    val = manifest(b.store, b.name, "validate")["results"]["metrics"]
    assert val["greedy_equal"] and val["greedy_batched_equal"]
    assert val["greedy_equal_to_near_tie"] and all(g["first_divergence"] is None for g in val["greedy"])
    assert val["num_beams"] == 2 and val["beams_equal"] and len(val["beams"]) == len(val["greedy"])  # beams judged
    assert val["visual_max_abs_diff"] < 1e-3 and val["logits_max_abs_diff"] < 1e-3
    assert val["top1_agreement"] == 1.0 and val["perplexity_rel_diff"] < 1e-3 and val["eval_tokens"] > 0
    assert val["visual_features"] == FEATURES[family] and len(val["greedy"]) == 3
    for g in val["greedy"]:
        assert g["engine"] == g["reference"] == g["batched"] and len(g["engine"]) == 10
    assert len({tuple(g["engine"]) for g in val["greedy"]}) == 3  # the image matters

    eng = manifest(b.store, b.name, "publish")["results"]["components"]["llm"]["engine"]
    assert eng["kind"] == "encoder-decoder"
    if family == "nougat":  # the features go to the decoder's cross-attention, no prompt table
        assert eng["encoder_input"] == "features" and eng["encoder_features"] == 12 and "prompt_table" not in eng
    else:  # the T5 encoder takes the features as prompt-table rows
        assert eng["encoder_input"] == "tokens" and eng["prompt_table"] == {"max_rows": 16, "hidden_size": 64}


@pytest.mark.parametrize("family", ["nougat", "blip2-t5"])
def test_run_with_images_equals_hf_generate(built, family, tmp_path, capsys):
    from PIL import Image

    b = built(family)
    a = write_image("checker", tmp_path / "a.png", size=40)
    c = write_image("rings", tmp_path / "c.png", size=57, height=75)  # not the model's size
    prompts = PROMPTS[family]
    capsys.readouterr()
    assert cli(["run", b.name, "--store", str(b.store), "--image", str(a), "--image", str(c),
                "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_features"] == FEATURES[family]
    for r, img, p in zip(out["results"], (a, c), prompts):
        assert r["prompt"] == p
        assert r["output_ids"] == hf_generate(b.src, Image.open(img).convert("RGB"), p, 9)
    assert out["results"][0]["output_ids"] != out["results"][1]["output_ids"]


def test_requests_over_the_built_limits_exit_2_naming_the_limit(built, tmp_path, capsys):
    img = str(write_image("gradient", tmp_path / "g.png"))
    long_prompt = " ".join(["engine"] * 60)
    for family, (too_long, seq) in {"nougat": ("max_input_len 16", "max_seq_len 32"),
                                    "blip2-t5": ("max_input_len 48", "max_seq_len 64")}.items():
        b = built(family)
        run = ["run", b.name, "--store", str(b.store)]
        capsys.readouterr()
        assert cli(run + ["--image", img] * 3 + ["--prompt", PROMPTS[family][1]]) == 2
        err = capsys.readouterr().err
        assert "3 images in one call" in err and f"max_multimodal_len {2 * FEATURES[family]} = 2 x" in err
        assert cli(run + ["--image", img, "--prompt", long_prompt]) == 2
        assert too_long in capsys.readouterr().err
        assert cli(run + ["--image", img, "--prompt", "a", "--max-new-tokens", "70"]) == 2
        err = capsys.readouterr().err
        assert seq in err and "Traceback" not in err
        assert cli(run + ["--prompt", "no image"]) == 2
        assert "is multimodal: give --image" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints the fixtures did not make


def _nougat_elsewhere(dest: Path) -> Path:
    """A Nougat made here with transformers' classes: 40 x 56 pages in 2 px
    patches, four Swin stages (12 features of width 96), an enc_to_dec_proj
    into a 3-layer, 6-head mBART decoder of width 48 with its own lm_head and
    no embedding scale."""
    from transformers import (DonutSwinConfig, MBartConfig, NougatProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)
    from transformers.models.nougat.image_processing_pil_nougat import NougatImageProcessorPil

    from enginefarm.testing.tiny import VOCAB, nougat_tokenizer, reinit

    enc = DonutSwinConfig(image_size=[40, 56], patch_size=2, embed_dim=12, depths=[1, 1, 1, 2],
                          num_heads=[1, 2, 2, 4], window_size=2)
    dec = MBartConfig(vocab_size=VOCAB, d_model=48, decoder_layers=3, decoder_attention_heads=6, decoder_ffn_dim=72,
                      encoder_layers=3, max_position_embeddings=128, scale_embedding=False, is_decoder=True,
                      add_cross_attention=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      decoder_start_token_id=0, tie_word_embeddings=False)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 1, 2
    torch.manual_seed(21)
    model = VisionEncoderDecoderModel(cfg)
    reinit(model.encoder, seed=21, std=0.1)  # four Swin stages: a smaller spread keeps the features moderate
    reinit(model.enc_to_dec_proj, seed=22)
    reinit(model.decoder, seed=23)
    assert model.enc_to_dec_proj is not None
    model.eval().save_pretrained(dest)
    NougatProcessor(image_processor=NougatImageProcessorPil(size={"height": 40, "width": 56}),
                    tokenizer=nougat_tokenizer()).save_pretrained(dest)
    return dest


def _blip2_t5_elsewhere(dest: Path) -> Path:
    """A BLIP-2 with a T5 of another kind: ReLU MLP, tied embeddings (decoder
    output scaled), 3 layers, 4 heads of 12 at width 48; 48 px images in 16 px
    patches, 5 query tokens."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, T5Config
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from enginefarm.testing.tiny import IMAGE_TOKEN_ID, MM_VOCAB, image_tokenizer, reinit

    text = T5Config(vocab_size=MM_VOCAB, d_model=48, d_kv=12, d_ff=80, num_layers=3, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="relu",
                    tie_word_embeddings=True, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                           image_size=48, patch_size=16),
        qformer_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                            encoder_hidden_size=40, cross_attention_frequency=1),
        text_config=text.to_dict(), num_query_tokens=5, image_token_index=IMAGE_TOKEN_ID)
    torch.manual_seed(22)
    model = Blip2ForConditionalGeneration(cfg)
    for part in (model.vision_model, model.qformer, model.language_projection):
        reinit(part, seed=22)
    model.eval().save_pretrained(dest)
    Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 48, "width": 48}),
                   tokenizer=image_tokenizer(), num_query_tokens=5).save_pretrained(dest)
    return dest


@pytest.mark.parametrize("family", ["nougat", "blip2-t5"])
def test_a_checkpoint_the_fixtures_did_not_make_builds_and_matches(family, tmp_path, capsys):
    from PIL import Image

    make = {"nougat": _nougat_elsewhere, "blip2-t5": _blip2_t5_elsewhere}[family]
    src = make(tmp_path / f"other-{family}")
    capsys.readouterr()
    assert cli(["recipe", "new", f"other-{family}", "--source", str(src)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["family"] == family.split("-")[0]
    data.update(components={"visual": {"backend": "onnxruntime"}, "llm": {}},
                limits={"max_batch_size": 2, "max_input_len": 40, "max_seq_len": 48},
                validation={"prompts": [PROMPTS[family][1]], "max_new_tokens": 8, "max_eval_tokens": 40,
                            "images": ["builtin:checker", "builtin:rings"],
                            "gates": {**data["validation"]["gates"], "greedy_equal": True}})
    p = tmp_path / f"other-{family}.yaml"
    p.write_text(yaml.safe_dump(data))
    store = str(tmp_path / "store")
    assert cli(["build", str(p), "--store", store, "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["variants"]["fp32-tp1"]["validation"] is True
    val = manifest(tmp_path / "store", f"other-{family}", "validate")["results"]["metrics"]
    assert val["visual_features"] == {"nougat": 12, "blip2-t5": 5}[family] and val["greedy_equal"]
    assert val["logits_max_abs_diff"] < 1e-3 and len(val["greedy"]) == 2
    img = write_image("gradient", tmp_path / "g.png", size=50, height=70)
    assert cli(["run", f"other-{family}", "--store", store, "--image", str(img), "--prompt", PROMPTS[family][0],
                "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
    assert got == hf_generate(src, Image.open(img).convert("RGB"), PROMPTS[family][0], 6)


# ----------------------------------------------------------------------------- no engine builds


def test_released_configs_give_the_seed_limits():
    """The released configs' facts (as their config.json states them): Nougat's
    896 x 672 pages give 588 features and a 16-head decoder; BLIP-2-Flan-T5-XL's
    32 query tokens feed a 32-head T5."""
    nougat = {"model_type": "vision-encoder-decoder", "decoder_start_token_id": 0,
              "encoder": {"model_type": "donut-swin", "image_size": [896, 672], "patch_size": 4, "embed_dim": 128,
                          "depths": [2, 2, 14, 2], "num_heads": [4, 8, 16, 32], "window_size": 7},
              "decoder": {"model_type": "mbart", "d_model": 1024, "decoder_layers": 10, "decoder_attention_heads": 16,
                          "decoder_ffn_dim": 4096, "vocab_size": 50000, "max_position_embeddings": 4096,
                          "scale_embedding": True, "add_cross_attention": True, "is_decoder": True}}
    fam = get_family("nougat")
    assert fam.features(nougat) == 588 and fam.image_size(nougat) == [896, 672]
    from enginefarm.families import load_recipe

    r = load_recipe(str(ROOT / "models" / "nougat-base.yaml"))
    lim = fam.derived_limits(r, nougat)
    assert lim["max_multimodal_len"] == 588 and lim["max_encoder_input_len"] == 588 and lim["max_input_len"] == 16
    dec = fam.checkpoint_parts(nougat, {"decoder.model.decoder.embed_tokens.weight"},
                               Variant(name="x", backend="aoti", dtype="float16", quant="none", tp=1, target="cpu"))
    assert [p.subdir for p in dec] == ["decoder"]
    c = dec[0].config
    assert (c["architecture"], c["num_attention_heads"], c["encoder_num_heads"], c["hidden_size"]) == ("DecoderModel", 16, 16, 1024)
    for tp in (1, 2, 4):
        fam.check_config(nougat, Variant(name="t", backend="aoti", dtype="float16", quant="none", tp=tp, target="cpu"))
    with pytest.raises(BadInput, match="does not divide the model's 16 decoder attention heads"):
        fam.check_config(nougat, Variant(name="t", backend="aoti", dtype="float16", quant="none", tp=3, target="cpu"))

    t5 = {"model_type": "blip-2", "num_query_tokens": 32,
          "text_config": {"model_type": "t5", "num_heads": 32, "d_model": 2048, "d_kv": 64, "num_layers": 24,
                          "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "d_ff": 5120}}
    blip2 = get_family("blip2")
    assert blip2.features(t5) == 32
    for tp in (1, 2, 4):
        blip2.check_config(t5, Variant(name="t", backend="aoti", dtype="float16", quant="none", tp=tp, target="cpu"))
    from enginefarm.spec import parse_recipe

    # the catalog recipe (TensorRT-LLM's example limits) holds the 32 features with the prompt
    catalog = load_recipe(str(ROOT / "models" / "blip2-flan-t5-xl.yaml"))
    assert blip2.derived_limits(catalog, t5)["max_multimodal_len"] == 8 * 32
    # a max_input_len that cannot hold the 32 features that go into the T5 encoder's input
    # with the prompt is refused after fetch, naming it
    data = yaml.safe_load((ROOT / "models" / "blip2-flan-t5-xl.yaml").read_text())
    data["limits"]["max_input_len"] = 32
    with pytest.raises(BadInput, match=r"limits.max_input_len \(32\) must hold an image's 32 visual features"):
        blip2.derived_limits(parse_recipe(data, "x.yaml"), t5)
    data["limits"]["max_input_len"] = 48
    assert blip2.derived_limits(parse_recipe(data, "x.yaml"), t5)["max_multimodal_len"] == 8 * 32


# ----------------------------------------------------------------------------- the converted checkpoints, eager


V32 = Variant(name="x", backend="aoti", dtype="float32", quant="none", tp=1, target="cpu")


def test_nougat_decoder_checkpoint_runs_as_hugging_face(tmp_path):
    """The bart conversion under Nougat's prefixes: a decoder/ checkpoint
    only, whose decoder (eager) fed Hugging Face's encoder output gives its
    logits and greedy tokens, prompts of different lengths in one call."""
    from transformers import GenerationConfig, VisionEncoderDecoderModel

    from enginefarm.checkpoint import convert_checkpoint
    from enginefarm.runtime.encdec import EncDecEngine, FeaturesCrossKV, load_encdec

    src = write_tiny("nougat", tmp_path / "src", seed=1)
    convert_checkpoint(get_family("nougat"), src, tmp_path / "ck", V32)
    assert (tmp_path / "ck" / "decoder" / "config.json").is_file() and not (tmp_path / "ck" / "encoder").exists()
    enc, dec = load_encdec(tmp_path / "ck")
    assert isinstance(enc, FeaturesCrossKV)
    eng = EncDecEngine.from_modules(enc, dec, {"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 32,
                                               "encoder_features": 12})
    hf = VisionEncoderDecoderModel.from_pretrained(src, dtype=torch.float32).eval()
    pixels = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = hf.encoder(pixel_values=pixels).last_hidden_state
        want = hf(pixel_values=pixels[:1], decoder_input_ids=torch.tensor([[0, 5, 9, 17]])).logits[0]
    assert float((eng.logits_from_features(feats[:1], [0, 5, 9, 17]) - want).abs().max()) < 1e-4
    prefixes = [[], [40, 41]]
    got = eng.generate_from_features(feats, prefixes, 6)
    for i, p in enumerate(prefixes):
        gc = GenerationConfig(max_new_tokens=6, do_sample=False, num_beams=1, decoder_start_token_id=0, eos_token_id=2,
                              pad_token_id=1)
        with torch.no_grad():
            out = hf.generate(pixel_values=pixels[i : i + 1], decoder_input_ids=torch.tensor([[0] + p]),
                              generation_config=gc)
        assert got[i] == out[0, 1 + len(p):].tolist()
    with pytest.raises(BadInput, match="takes images, not a text prompt"):
        eng.generate([[5, 6]], 3)
    with pytest.raises(BadInput, match="10 encoder features per image, but the decoder was built for 12"):
        eng.generate_from_features(feats[:1, :10], [[]], 3)


def test_blip2_t5_encoder_takes_the_features_as_prompt_table_rows(tmp_path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from enginefarm.checkpoint import convert_checkpoint
    from enginefarm.images import builtin_image
    from enginefarm.runtime.encdec import EncDecEngine, load_encdec
    from enginefarm.runtime.multimodal import engine_ids

    src = write_tiny("blip2-t5", tmp_path / "src", seed=1)
    fam = get_family("blip2")
    convert_checkpoint(fam, src, tmp_path / "ck", V32)
    enc, dec = load_encdec(tmp_path / "ck")
    eng = EncDecEngine.from_modules(enc, dec, {"max_batch_size": 2, "max_input_len": 48, "max_seq_len": 32,
                                               "prompt_table": {"max_rows": 16, "hidden_size": 64}})
    hf = Blip2ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(src)
    e = proc(images=[builtin_image("rings")], text=["a photo of"], return_tensors="pt")
    cfg = json.loads((src / "config.json").read_text())
    meta = fam.visual_meta(cfg)
    with torch.no_grad():
        table = fam.reference_features(hf, [e])[0]
        want = hf(**e, decoder_input_ids=torch.tensor([[1, 7, 8]])).logits[0]
    ids = engine_ids(e["input_ids"][0].tolist(), 0, 8, meta)
    assert ids[:8] == list(range(meta["vocab_size"], meta["vocab_size"] + 8))
    assert float((eng.logits(ids, [1, 7, 8], table) - want).abs().max()) < 1e-4
    assert eng.generate([ids], 6, prompt_table=table)[0] == fam.reference_generate(hf, e, 1, 6, 2, 1)
    with pytest.raises(BadInput, match="past the vocabulary"):
        eng.generate([ids], 3)  # feature rows without a table


def test_plan_prints_the_encoder_decoder_trtllm_build_once_the_llm_is_known(tmp_path, capsys):
    """BLIP-2's LLM (OPT or T5) is known from the fetched config.json: once
    fetch is cached, `plan` prints the two trtllm-build runs of a T5 LLM
    (encoder with the prompt table, then decoder); Nougat's is the decoder alone."""
    from enginefarm.tasks import fetch as F
    from enginefarm.tasks.base import Ctx
    from enginefarm.families import load_recipe

    src = write_tiny("blip2-t5", tmp_path / "src", seed=1)
    data = {"name": "plan-blip2-t5", "family": "blip2", "source": {"path": str(src)},
            "components": {"visual": {}, "llm": {"backend": "tensorrt-llm"}},
            "matrix": {"backend": ["aoti"], "dtype": ["float16"], "quant": ["none"], "tp": [1], "target": ["cpu"]},
            "limits": {"max_batch_size": 2, "max_input_len": 48, "max_seq_len": 64}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    store = str(tmp_path / "store")
    ctx = Ctx(store=open_store(store), recipe=load_recipe(str(recipe)))
    F.run_step(ctx, F.spec(ctx), F._work(ctx, F.spec(ctx)))
    capsys.readouterr()
    assert cli(["plan", str(recipe), "--store", store]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "build[llm]: trtllm-build" in x)
    enc, dec = line.split(" && ")
    assert "--checkpoint_dir CKPT/encoder" in enc and "--max_prompt_embedding_table_size" in enc
    assert "--checkpoint_dir CKPT/decoder" in dec and "--max_encoder_input_len" in dec
    # before a fetch: Nougat's LLM is always its mBART decoder; BLIP-2's may be OPT or T5, which only the
    # fetched config.json tells (llm_parts None); plan then prints the commands for both
    assert get_family("nougat").llm_parts() == ("decoder",) and get_family("blip2").llm_parts() is None
    assert get_family("blip2").llm_part_choices() == [("opt (decoder-only)", ("",)),
                                                     ("t5 (encoder-decoder)", ("encoder", "decoder"))]
    assert get_family("llava").llm_parts() == ("",)
    assert cli(["plan", "blip2-flan-t5-xl", "--store", str(tmp_path / "other-store"), "--variant", "fp16-tp2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    t5 = next(x for x in lines if "build[llm] if the LLM is t5 (encoder-decoder)" in x)
    assert t5.count("trtllm-build") == 2 and "CKPT/encoder" in t5 and "--max_encoder_input_len" in t5
    assert "--workers 2" in t5 and any("build[llm] if the LLM is opt (decoder-only)" in x for x in lines)


# ----------------------------------------------------------------------------- the reference step


def test_a_second_variant_validates_against_the_stored_reference(built, tmp_path, monkeypatch):
    """The Hugging Face reference of a multimodal recipe with an encoder-decoder
    LLM is the reference step's, computed once and cut to the engines'
    max_decoder_tokens: a second variant (a bf16 LLM) built into the same
    store finds it cached, its validate reads it (the Hugging Face class is
    not loaded anywhere in that build) and judges its engines against it
    (BLIP-2 with Flan-T5: its onnxruntime visual engine costs no compile)."""
    import transformers

    b = built("blip2-t5")
    st = open_store(str(b.store))
    (ref,) = [st.get_manifest(*r) for r in st.list_manifests(b.name, "reference")]
    assert ref["params"]["limits"]["max_decoder_tokens"] == 48  # min(max_input_len 48, max_seq_len 64)
    r = ref["results"]
    assert r["pairs"] == 3 and r["media"] == 3 and r["eval_windows"] > 0
    cfg = json.loads((b.src / "config.json").read_text())
    assert r["decoder_start_token_id"] == cfg["text_config"]["decoder_start_token_id"]
    assert {"logits.safetensors", "outputs.json"} <= set(ref["files"])
    (val1,) = [st.get_manifest(*x) for x in st.list_manifests(b.name, "validate")]
    assert val1["inputs"]["reference"]["key"] == ref["key"]

    loads = count_loads(monkeypatch, transformers.Blip2ForConditionalGeneration)  # the real loader, counted
    val2 = build_bf16_beside(b, tmp_path, loads, ref["key"], val1["key"])
    m, m1 = val2["results"]["metrics"], val1["results"]["metrics"]
    # judged against the same reference: a bf16 LLM next to fp32 Hugging Face, not equal to it; the fp32 visual
    assert len(m["greedy"]) == 3 and 0 < m["logits_max_abs_diff"] < float("inf") and m["visual_max_abs_diff"] < 1e-3
    assert [g["reference"] for g in m["greedy"]] == [g["reference"] for g in m1["greedy"]]
    assert m["perplexity"]["reference"] == m1["perplexity"]["reference"] and m["eval_tokens"] == m1["eval_tokens"]


@pytest.mark.parametrize("family", ["nougat", "blip2-t5"])
def test_the_reference_key_follows_images_and_decoder_limits(built, family, tmp_path):
    """An image whose bytes change under the same name, or limits that cut the
    decoder's inputs otherwise (max_decoder_tokens), change the reference's
    key; the variant does not enter it. A stored reference whose limits,
    decoder start token or stop token are not the engines' is refused for
    them, with the reason."""
    from enginefarm.backends import get_backend
    from enginefarm.families import load_recipe
    from enginefarm.flows.gpu import stored_result
    from enginefarm.tasks import reference as reference_step
    from enginefarm.tasks.base import Ctx, materialize

    b = built(family)
    st, fetched = stored_fetch(b)
    img = tmp_path / "picture.png"
    data = yaml.safe_load(b.recipe.read_text())
    data["validation"]["images"] = [str(img), "builtin:rings"]
    p = tmp_path / "r.yaml"

    def spec(**limits):
        p.write_text(yaml.safe_dump({**data, "limits": {**data["limits"], **limits}}))
        ctx = Ctx(store=st, recipe=load_recipe(str(p)))
        assert reference_step.needed(ctx, fetched)
        return reference_step.spec(ctx, fetched)

    write_image("rings", img)
    k1 = spec().key()
    assert spec().key() == k1
    write_image("checker", img)
    k2 = spec().key()
    assert k2 != k1
    data["matrix"]["dtype"] = ["float32", "bfloat16"]
    assert spec().key() == k2
    lim = data["limits"]
    s = spec(max_input_len=lim["max_input_len"] - 1)  # the decoder takes one token fewer in one pass
    assert s.params["limits"]["max_decoder_tokens"] == min(lim["max_input_len"] - 1, lim["max_seq_len"])
    assert s.key() not in (k1, k2)

    # the stored reference against the built engines: it fits them; other limits or tokens do not
    (ref,) = [st.get_manifest(*x) for x in st.list_manifests(b.name, "reference")]
    referenced = stored_result(st, b.name, "reference", ref["key"])
    (build_llm,) = [m for m in (st.get_manifest(*x) for x in st.list_manifests(b.name, "build"))
                    if m["params"]["component"] == "llm" and m["variant"] == "fp32-tp1"]
    built_llm = stored_result(st, b.name, "build", build_llm["key"])
    ctx = Ctx(store=st, recipe=load_recipe(str(b.recipe)))
    llm = get_backend(build_llm["params"]["backend"]).load(materialize(ctx, built_llm, tmp_path / "llm"))
    eos = ref["results"]["eos_token_id"]
    assert reference_step.mismatch(referenced, llm, eos) is None
    cut = json.loads(json.dumps(ref))
    cut["params"]["limits"]["max_decoder_tokens"] -= 1
    other = type(referenced)(referenced.step, referenced.key, referenced.digest, cut, cached=True)
    assert reference_step.mismatch(other, llm, eos) == (
        f"the reference was cut with max_decoder_tokens {llm.max_decoder_tokens - 1}, the engine has "
        f"{llm.max_decoder_tokens}")
    cut = json.loads(json.dumps(ref))
    cut["results"]["decoder_start_token_id"] += 1
    other = type(referenced)(referenced.step, referenced.key, referenced.digest, cut, cached=True)
    assert "decoder starts from token" in reference_step.mismatch(other, llm, eos)
    assert "the engines stop at" in reference_step.mismatch(referenced, llm, eos + 1)
