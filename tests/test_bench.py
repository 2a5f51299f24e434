"""`enginefarm bench` on a tiny CPU engine, and the CPU-checkable parts of
the GPU engine form (weight layout of the decode kernels, engine-form
decoder, in-place caches). The kernels themselves need a GPU
(bench/gpu_kernels.py checks them there)."""

import json
from pathlib import Path

import pytest
import torch

from enginefarm.cli import main as cli
from enginefarm.kernels import gemv as G
from enginefarm.quant import Scheme, dequantize, int_values, quantize
from enginefarm.spec import parse_recipe
from enginefarm.testing import write_tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (8, 64), (4, 32)])
def test_engine_layout_and_reference_match_dequantize(bits, group):
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    q, s = quantize(w, Scheme(bits, group), torch.float32)
    packed, scale = G.pack_weight(int_values(q, bits), s, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 256 if bits == 8 else 128)
    assert torch.equal(G.unpack_weight(packed, bits).t().to(torch.int8), int_values(q, bits))
    x = torch.randn(3, 256)
    ref = x @ dequantize(q, s, bits).t()
    assert torch.allclose(G.reference(x, packed, scale, bits), ref, atol=1e-4, rtol=1e-4)


def test_default_configs_respect_groups_and_shapes():
    for bits in (16, 8, 4):
        for n, k in ((4096, 4096), (22016, 4096), (4096, 11008), (1000, 256)):
            c = G.default_config(bits, n, k, group=64 if bits != 16 else 0)
            assert c.block_k <= 64 or bits == 16
            assert c.split_k >= 1 and k >= c.block_k


def _decoder(quant, group=None):
    from enginefarm.checkpoint import convert_in_memory
    from enginefarm.families import get_family
    from enginefarm.runtime.decoder import DecoderConfig, DecoderLM
    from enginefarm.spec import Variant
    from transformers import AutoModelForCausalLM

    import os

    src = write_tiny("llama", Path(os.environ["ENGINEFARM_TINY_DIR"]) / "bench-src", seed=2)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    v = Variant(name="x", backend="aoti", dtype="float32", quant=quant, tp=1, target="cpu", group_size=group)
    calibration = None
    if quant == "w4a16_awq":  # a pre-quant scale per linear, far from 1 (q/k/v's averaged into qkv's, as ModelOpt's)
        g = torch.Generator().manual_seed(3)
        calibration = {f"{n}.pre_quant_scale": torch.rand(m.in_features, generator=g) * 4 + 0.25
                       for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    cfg, W = convert_in_memory(get_family("llama"), hf.config.to_dict(), hf.state_dict(), v, calibration=calibration)
    return DecoderLM(DecoderConfig.from_trtllm(cfg), W).eval()


@pytest.mark.parametrize("quant,group", [("none", None), ("w8a16", None), ("w4a16", None), ("w4a16", 16),
                                         ("w4a16_awq", 16)])
def test_engine_form_equals_checkpoint_form_and_caches_are_written_in_place(quant, group):
    from enginefarm.runtime.swaps import prepare_engine

    ref, m = _decoder(quant, group), prepare_engine(_decoder(quant, group))
    if quant == "w4a16_awq":  # fc and gate keep their own pre-quant scales: two products, each scaling its input
        assert m.layers[0].fc_gate is None and m.layers[0].fc.pre_quant_scale is not None
        assert m.layers[0].qkv.pre_quant_scale is not None
    else:
        assert m.layers[0].fc_gate is not None and m.layers[0].fc is None
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        kc, vc = ref.new_cache(1, 16)
        lr, _, _ = ref(ids, torch.tensor([0]), kc, vc)
        k2, v2 = m.new_cache(1, 16)
        per_layer_k, per_layer_v = list(k2.unbind(0)), list(v2.unbind(0))
        lm = m.logits(ids, torch.tensor([0]), per_layer_k, per_layer_v)
    assert (lr - lm).abs().max() < 1e-4
    assert torch.allclose(kc, k2, atol=1e-5) and k2[:, :, :, :5].abs().sum() > 0 and k2[:, :, :, 5:].abs().sum() == 0


def test_aoti_options_in_recipes():
    base = {"name": "x", "family": "llama", "source": {"tiny": "llama"}}
    r = parse_recipe({**base, "components": {"llm": {"aoti": {"max_autotune": True, "cuda_graphs": True}}}}, "t")
    assert r.components["llm"].aoti.max_autotune and r.components["llm"].aoti.attention == "auto"
    from enginefarm.errors import BadInput

    with pytest.raises(BadInput, match="attention"):
        parse_recipe({**base, "components": {"llm": {"aoti": {"attention": "fastest"}}}}, "t")


def test_bench_cli_on_a_tiny_cpu_engine(tmp_path, capsys):
    import yaml

    from enginefarm.flows.build import build
    from enginefarm.store import open_store

    src = write_tiny("llama", tmp_path / "src", seed=5)
    data = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-llama.yaml").read_text())
    data.update(name="bench-llama", source={"path": str(src)})
    data["validation"]["max_eval_tokens"] = 32
    recipe = tmp_path / "bench-llama.yaml"
    recipe.write_text(yaml.safe_dump(data))
    store = str(tmp_path / "store")
    build(recipe=str(recipe), store=store)
    capsys.readouterr()
    args = ["bench", "bench-llama:fp32-tp1", "--store", store, "--batch", "1,2,4", "--input-len", "4,40",
            "--output-len", "3", "--warmup", "1", "--iters", "2"]
    assert cli(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    pts = {(r["batch"], r["input_len"], r["output_len"]) for r in rep["rows"]}
    assert pts == {(1, 4, 3), (2, 4, 3)}  # batch 4 and input 40 exceed the recipe's limits: skipped, said why
    assert any("max_batch_size" in x for x in rep["skipped"]) and any("max_input_len" in x for x in rep["skipped"])
    for r in rep["rows"]:
        for side in ("engine", "eager"):
            f = r[side]
            assert f["ttft_ms"] > 0 and f["decode_ms_per_token"] > 0
            assert f["tokens_per_s"] == pytest.approx(r["batch"] * f["tokens_per_s_per_user"], rel=1e-2)
        assert r["speedup_decode"] > 0
        assert r["tokens_equal"] is True  # fp32: the engine's greedy tokens are generate's
    assert rep["env"]["device"] == "cpu" and rep["settings"]["timer"] == "wall clock"
    assert "visual_rows" not in rep  # a text engine: no visual part
    st = open_store(store)
    recorded = st.get_manifest_by_path(rep["recorded"])
    assert recorded["results"]["rows"] == rep["rows"]
    assert recorded["inputs"]["publish"]["digest"] == rep["ref"]["digest"]
    # a table by default; bad input exits 2 with one line
    assert cli(args[:4] + ["--batch", "1", "--input-len", "4", "--output-len", "3", "--iters", "1", "--no-eager",
                           "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "bench-llama:fp32-tp1@latest" in out
    assert cli(["bench", "bench-llama", "--store", store, "--batch", "x"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert cli(["bench", "bench-llama", "--store", store, "--batch", "8", "--no-eager"]) == 2


def test_prompt_table_rows_replace_ids_at_or_above_the_vocab():
    """Multimodal engines splice visual features in through a prompt table
    (ids >= vocab_size pick its rows), as TensorRT-LLM's prompt tuning does."""
    m = _decoder("none")
    V, h = m.cfg.vocab_size, m.cfg.hidden_size
    torch.manual_seed(1)
    table = torch.randn(3, h)
    ids = torch.tensor([[5, V + 0, V + 1, V + 2, 9]])
    x = m.embed_tokens(ids, table)
    assert torch.equal(x[0, 1:4], table) and torch.equal(x[0, 0], m.embed[5]) and torch.equal(x[0, 4], m.embed[9])
    with torch.no_grad():
        kc, vc = m.new_cache(1, 16)
        lg = m.logits(ids, torch.tensor([0]), kc, vc, table)
    assert torch.isfinite(lg).all() and lg.shape == (1, 5, V)


def test_recipe_aoti_options_reach_the_engine(tmp_path):
    """components.llm.aoti set: the build step passes the options to the aoti backend's
    one exporter (on the CPU: the general package, weights inside: there is no decode
    package to share them with), records them in the sidecar, and validation runs it."""
    import yaml

    from enginefarm.backends import get_backend
    from enginefarm.flows.build import build
    from enginefarm.runtime.engine import LLMEngine
    from enginefarm.registry import resolve
    from enginefarm.store import open_store

    src = write_tiny("llama", tmp_path / "src", seed=5)
    data = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-llama.yaml").read_text())
    data.update(name="opts-llama", source={"path": str(src)})
    data.setdefault("components", {}).setdefault("llm", {})["aoti"] = {"coordinate_descent_tuning": "decode"}
    data["validation"]["max_eval_tokens"] = 32
    recipe = tmp_path / "opts-llama.yaml"
    recipe.write_text(yaml.safe_dump(data))
    store = str(tmp_path / "store")
    build(recipe=str(recipe), store=store)
    st = open_store(store)
    value, m = resolve(st, "opts-llama:fp32-tp1")
    files = sorted(m["files"])
    assert files == ["llm/engine.json", "llm/llm.pt2"], files
    from enginefarm.benchmark import engine_files

    eng_dir, _ = engine_files(st, value, m, cache_root=tmp_path / "cache")
    meta = json.loads((eng_dir / "engine.json").read_text())
    assert meta["version"] == 3 and meta["options"]["decode_kernels"] is True
    eng = get_backend("aoti").load(eng_dir)
    assert isinstance(eng, LLMEngine)
    assert m["results"]["validation"]["passed"], m["results"]["validation"]


def test_coordinate_descent_tuning_in_every_package_or_the_decode_package_alone(tmp_path):
    """`coordinate_descent_tuning: decode` tunes the LLM's one-token step
    only (its M = 1 products), never prefill or a visual package; `true`
    tunes all of them; anything else is a recipe error naming the field."""
    from enginefarm.errors import BadInput
    from enginefarm.runtime.export import inductor_configs
    from enginefarm.families import load_recipe
    from enginefarm.spec import AotiOptions

    tuned = {v: [p for p in ("general", "decode")
                 if inductor_configs(AotiOptions(coordinate_descent_tuning=v), True, p).get("coordinate_descent_tuning")]
             for v in (False, True, "decode")}
    assert tuned == {False: [], True: ["general", "decode"], "decode": ["decode"]}
    text = (ROOT / "models" / "tiny" / "tiny-llama.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  llm: {}", "  llm: {aoti: {coordinate_descent_tuning: prefill}}"))
    assert "coordinate_descent_tuning: prefill" in bad.read_text()
    with pytest.raises(BadInput, match="coordinate_descent_tuning"):
        load_recipe(str(bad))


def test_packages_sharing_a_weights_file_load_it_user_managed(tmp_path):
    """The path the CUDA build takes for its prefill and decode packages,
    on the CPU: a package compiled without its weights
    (package_constants_in_so=False), the weights file beside it, handed to
    the runner at load (load_constants, user-managed); it equals the eager
    model, and generates as it does, greedy and beam search."""
    from enginefarm.runtime.engine import load_engine
    from enginefarm.runtime.export import export_llm

    ref = _decoder("w8a16")
    limits = {"max_batch_size": 2, "max_input_len": 8, "max_seq_len": 16, "max_beam_width": 2}
    side = export_llm(_decoder("w8a16"), tmp_path, limits, "cpu", {"cuda_graphs": True}, packages=("general",))
    assert side.files == {"general": "llm.pt2", "weights": "weights.safetensors"} and side.max_beam_width == 2
    eng = load_engine(tmp_path)
    assert eng.weights is not None and eng.decode_run is None and not eng.cuda_graphs  # graphs: CUDA only
    ids = [5, 17, 42, 99, 3]
    with torch.no_grad():
        kc, vc = ref.new_cache(1, 16)
        want, _, _ = ref(torch.tensor([ids]), torch.tensor([0]), kc, vc)
    assert (eng.logits(ids) - want[0]).abs().max() < 1e-3
    toks = []
    with torch.no_grad():
        nxt = want[:, -1].argmax(-1, keepdim=True)
        for i in range(4):
            toks.append(int(nxt))
            lg, _, _ = ref(nxt, torch.tensor([len(ids) + i]), kc, vc)
            nxt = lg[:, -1].argmax(-1, keepdim=True)
    assert eng.generate([ids, ids[:3]], 4)[0] == toks
    # beam search reorders the caches between in-place steps: the package as the eager model does it
    from enginefarm.runtime.decoding import Decoding
    from enginefarm.runtime.engine import LLMEngine

    eager = LLMEngine(_decoder("w8a16"), side)
    beam = Decoding(num_beams=2)
    got = eng.generate([ids, [9, 8, 7, 6, 5]], 5, decoding=beam)
    assert got == eager.generate([ids, [9, 8, 7, 6, 5]], 5, decoding=beam) and all(len(g) == 5 for g in got)


def test_gpu_product_llava7b_recipe_and_processor_check_here(tmp_path):
    """bench/gpu_product.sh llava7b runs on a GPU machine only; its recipe and
    the inputs it writes are checked here: the recipe passes the llava
    family's checks, LLaVA-1.5-7B's config (bench/models.py, without its
    weights) gives 576 features that the limits hold, and the tiny
    fixture's processor at 336 px / 14 px patches writes as many
    placeholders, under the id the config names."""
    import sys

    sys.path.insert(0, str(ROOT))
    from bench.models import llava_config, llava_processor
    from enginefarm.families import get_family, load_recipe
    from enginefarm.images import builtin_image
    from enginefarm.testing.tiny import IMAGE_TOKEN_ID

    script = (ROOT / "bench" / "gpu_product.sh").read_text()
    body = script.split('cat > "$W/llava-7b-shaped.yaml" <<YAML\n')[1].split("\nYAML\n")[0]
    path = tmp_path / "llava-7b-shaped.yaml"
    path.write_text(body.replace("$SRC", str(tmp_path / "src")).replace("$SM", "sm_90").replace("$Q", "none, w8a16")
                    .replace("$DTYPE", "float16").replace("$DEFV", "fp16-tp1").replace("$MB", "1").replace("$LNAME", "llava-7b-shaped")
                    .replace("$VAOTI", "{cuda_graphs: true}").replace("$LAOTI", "{cuda_graphs: true}"))
    recipe = load_recipe(str(path))
    assert [v.name for v in recipe.variants()] == ["fp16-tp1", "fp16-w8a16-tp1"]
    assert recipe.components["visual"].aoti.cuda_graphs and recipe.components["llm"].aoti.cuda_graphs
    fam = get_family("llava")
    config = llava_config(image_token_index=IMAGE_TOKEN_ID).to_dict()
    for v in recipe.variants():
        fam.check_config(config, v)
    assert fam.features(config) == 576 and fam.visual_meta(config)["image_token_id"] == IMAGE_TOKEN_ID
    assert fam.derived_limits(recipe, config)["max_multimodal_len"] == 576
    proc = llava_processor()
    enc = fam.encode(proc, builtin_image("gradient"), "What is it?", "<image>")
    assert int((enc["input_ids"] == IMAGE_TOKEN_ID).sum()) == 576 and tuple(enc["pixel_values"].shape) == (1, 3, 336, 336)
