"""The near-tie rule (issue 19, "fp16 engine greedy vs eager"): an engine's
greedy tokens equal to the fp32 reference's up to the first near-tie. The
reference keeps each greedy step's top-k logits; compare() finds each
prompt's first divergence and reads the reference's gap there between its
token and the engine's; the `greedy_equal_to_near_tie` gate (off unless a
recipe sets it) passes a run whose gap is at most the tie margin, the larger
of `greedy_tie_margin` and twice the measured logits_max_abs_diff."""

from __future__ import annotations

import json

import pytest
import torch

from enginefarm.evaluation import (GREEDY_TOP, compare, gates_line, greedy_line, greedy_top, judge, load_outputs,
                                   save_outputs)
from enginefarm.spec import DEFAULT_TIE_MARGIN, Gates

VOCAB = 16


def _step(ranked: list[tuple[int, float]]) -> torch.Tensor:
    """One step's logits over VOCAB: the given (token, logit) pairs, every other token far below."""
    x = torch.full((VOCAB,), -10.0)
    for t, v in ranked:
        x[t] = v
    return x


def _ref(generated: list[int], steps: list[torch.Tensor] | None, logits=None) -> dict:
    p = {"ids": [1, 2], "logits": torch.zeros(2, VOCAB) if logits is None else logits, "generated": generated}
    if steps is not None:
        p.update(greedy_top(torch.stack(steps)))
    return {"prompts": [p], "eval": []}


def _eng(generated: list[int], logits=None) -> dict:
    return {"prompts": [{"ids": [1, 2], "logits": torch.zeros(2, VOCAB) if logits is None else logits,
                         "generated": generated}], "eval": []}


# the reference's greedy run 3, 4, 5, 6; at step 1 token 4 leads token 9 by 0.02 (a near-tie) and token 7 by 1.5
STEPS = [_step([(3, 5.0), (8, 2.0)]), _step([(4, 5.00), (9, 4.98), (7, 3.5)]),
         _step([(5, 6.0), (1, 1.0)]), _step([(6, 4.0), (2, 3.0)])]
REF = [3, 4, 5, 6]
ON = {"greedy_equal": False, "greedy_equal_to_near_tie": True, "greedy_tie_margin": DEFAULT_TIE_MARGIN}


def test_greedy_top_keeps_each_steps_top_k_best_first():
    t = greedy_top(tuple(s[None] for s in STEPS))  # generate(output_logits=True)'s form: one [1, vocab] a step
    ids, vals = t[GREEDY_TOP[0]], t[GREEDY_TOP[1]]
    assert ids.dtype == torch.int32 and tuple(ids.shape) == tuple(vals.shape) == (4, 8)
    assert ids[:, 0].tolist() == REF and ids[1, :3].tolist() == [4, 9, 7]
    assert vals[1, 0] - vals[1, 1] == pytest.approx(0.02, abs=1e-5)  # the step's own tie margin
    assert torch.equal(greedy_top(torch.stack(STEPS))[GREEDY_TOP[0]], ids)  # teacher-forced form: the same


def test_exact_equality_passes():
    m = compare(_eng(REF), _ref(REF, STEPS))
    assert m["greedy_equal"] and m["greedy_equal_to_near_tie"]
    assert m["greedy"][0]["first_divergence"] is None and m["greedy"][0]["near_tie_equal"]
    gates = judge(m, ON)
    assert gates["greedy_equal_to_near_tie"]["passed"] and "greedy_tie_margin" not in gates


def test_a_divergence_at_a_near_tie_passes_and_what_follows_is_not_judged():
    m = compare(_eng([3, 9, 0, 0]), _ref(REF, STEPS))  # after the tie: other tokens entirely
    assert not m["greedy_equal"] and m["greedy_equal_to_near_tie"]
    g = m["greedy"][0]
    assert g["first_divergence"] == 1 and g["tie_gap"] == pytest.approx(0.02, abs=1e-5) and g["near_tie_equal"]
    assert m["greedy_tie_margin_used"] == DEFAULT_TIE_MARGIN  # the logits agree exactly: the floor
    gates = judge(m, ON)
    assert gates["greedy_equal_to_near_tie"] == {"value": True, "limit": True, "passed": True,
                                                 "margin": DEFAULT_TIE_MARGIN}
    assert "greedy_equal" not in gates  # off in ON; judged, the exact gate fails this run
    assert judge(m, {**ON, "greedy_equal": True})["greedy_equal"]["passed"] is False
    assert "greedy_equal_to_near_tie=True (tie margin 0.05)" in gates_line(gates)


def test_a_divergence_at_a_wide_gap_fails():
    m = compare(_eng([3, 7, 5, 6]), _ref(REF, STEPS))  # token 7 trails the reference's by 1.5
    g = m["greedy"][0]
    assert g["first_divergence"] == 1 and g["tie_gap"] == pytest.approx(1.5) and not g["near_tie_equal"]
    assert m["greedy_equal_to_near_tie"] is False
    gates = judge(m, ON)
    assert gates["greedy_equal_to_near_tie"]["passed"] is False
    assert "greedy_equal_to_near_tie=False (limit True) (tie margin 0.05)" in gates_line(gates)
    # a recipe's larger floor makes it a tie
    assert compare(_eng([3, 7, 5, 6]), _ref(REF, STEPS), tie_margin=2.0)["greedy_equal_to_near_tie"]


def test_the_margin_is_at_least_twice_the_measured_logits_difference():
    """An engine whose logits are off by 0.8 can flip a gap of up to 1.6: the 1.5 gap is then a tie."""
    off = torch.zeros(2, VOCAB)
    off[0, 0] = 0.8
    m = compare(_eng([3, 7, 5, 6], logits=off), _ref(REF, STEPS))
    assert m["logits_max_abs_diff"] == pytest.approx(0.8)
    assert m["greedy_tie_margin_used"] == pytest.approx(1.6) and m["greedy_equal_to_near_tie"]
    nan = torch.full((2, VOCAB), float("nan"))
    assert compare(_eng([3, 9, 5, 6], logits=nan), _ref(REF, STEPS))["greedy_equal_to_near_tie"] is False


def test_a_token_outside_the_references_top_k_or_a_shorter_run_fails():
    wide = [_step([(t, 10.0 - t * 0.001) for t in range(9)])] + STEPS[1:]  # 9 tokens within 0.008
    m = compare(_eng([15, 4, 5, 6]), _ref([0, 4, 5, 6], wide))  # token 15: not among the top 8
    g = m["greedy"][0]
    assert g["tie_gap_at_least"] and g["tie_gap"] == pytest.approx(0.007, abs=1e-5) and not g["near_tie_equal"]
    m = compare(_eng([3, 4]), _ref(REF, STEPS))  # stopped where the reference goes on
    assert m["greedy"][0]["first_divergence"] == 2 and not m["greedy_equal_to_near_tie"]


def test_a_reference_without_the_steps_top_k_skips_the_gate():
    """A reference stored before the top-k: the metric is absent and its gate unjudged (the others are)."""
    m = compare(_eng([3, 9, 5, 6]), _ref(REF, None))
    assert "greedy_equal_to_near_tie" not in m and "first_divergence" not in m["greedy"][0]
    gates = judge(m, {**ON, "greedy_equal": True})
    assert set(gates) == {"greedy_equal"} and gates["greedy_equal"]["passed"] is False


def test_the_default_gates_judge_what_they_judged_before():
    """Unset, the new gate is off and its margin is no gate: an existing recipe's gates are the same set."""
    m = compare(_eng([3, 9, 5, 6]), _ref(REF, STEPS))
    gates = judge(m, Gates().model_dump())
    assert set(gates) == {"logits_max_abs_diff", "top1_agreement", "greedy_equal", "perplexity_rel_diff",
                          "top5_accuracy_drop"}


def test_stored_outputs_keep_the_top_k_and_old_ones_load_without_it(tmp_path):
    out = _ref(REF, STEPS)
    save_outputs(out, tmp_path)
    back = load_outputs(tmp_path)["prompts"][0]
    assert all(torch.equal(back[k], out["prompts"][0][k]) for k in GREEDY_TOP)
    assert set(json.loads((tmp_path / "outputs.json").read_text())["prompts"][0]) == {"ids", "generated"}

    old = tmp_path / "old"
    old.mkdir()
    save_outputs(_ref(REF, None), old)  # the files as a reference step before the top-k wrote them
    back = load_outputs(old)["prompts"][0]
    assert not any(k in back for k in GREEDY_TOP) and back["generated"] == REF


def test_a_negative_tie_margin_exits_2_naming_the_field(tmp_path, capsys):
    from enginefarm.cli import main as cli

    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nfamily: llama\nsource: {tiny: llama}\n"
                 "validation:\n  gates: {greedy_equal_to_near_tie: true, greedy_tie_margin: -0.1}\n")
    assert cli(["build", str(p), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "validation.gates.greedy_tie_margin" in err and "Traceback" not in err


def test_the_validate_log_line_says_the_greedy_verdict_gated_or_not():
    """validate logs it whether or not the gate is on (a GPU run keeps its log, not always its store)."""
    assert greedy_line(compare(_eng(REF), _ref(REF, STEPS))) == (
        "greedy: 1 of 1 prompt(s) equal to the reference; near-tie rule (margin 0.05): held")
    tie = greedy_line(compare(_eng([3, 9, 0, 0]), _ref(REF, STEPS)))
    assert tie == ("greedy: 0 of 1 prompt(s) equal to the reference; near-tie rule (margin 0.05): held "
                   "(first divergence: token 1 of 4, gap 0.02)")
    assert greedy_line(compare(_eng([3, 7, 0, 0]), _ref(REF, STEPS))).endswith("broken (first divergence: token 1 of 4, gap 1.5)")
    assert greedy_line(compare(_eng([3, 9]), _ref(REF, None))) == "greedy: 0 of 1 prompt(s) equal to the reference"
    assert greedy_line({"greedy": []}) is None


def test_a_real_build_shows_the_near_tie_metric_in_validate(tmp_path):
    """A tiny llama built through the flow in fp16 (aoti, CPU), its recipe
    setting the gate: the reference step stores each prompt's greedy steps'
    top-k beside its logits (the reference's own tokens are their first
    column), and the validate results hold the metric, the margin it used,
    each prompt's first divergence, and the judged gate. (This seed's fp16
    engine keeps the reference's tokens: the divergent cases are the
    constructed ones above.)"""
    import yaml

    from enginefarm.flows.build import build
    from enginefarm.store import open_store
    from enginefarm.testing import write_tiny
    from helpers import ROOT, recipe_for

    src = write_tiny("llama", tmp_path / "src", seed=9)
    validation = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-llama.yaml").read_text())["validation"]
    validation["gates"] = {"logits_max_abs_diff": 0.05, "top1_agreement": 0.9, "greedy_equal": False,
                           "greedy_equal_to_near_tie": True, "perplexity_rel_diff": 0.01,
                           "top5_accuracy_drop": 0.05}
    recipe = recipe_for(tmp_path, "tie-llama", "llama", src, validation=validation, default_variant=None,
                        matrix={"backend": ["aoti"], "dtype": ["float16"], "quant": ["none"], "tp": [1],
                                "target": ["cpu"]})
    store = tmp_path / "store"
    out = build(recipe=str(recipe), store=str(store))

    st = open_store(str(store))
    ((_, _, key),) = st.list_manifests("tie-llama", "reference")
    for rel, info in st.get_manifest("tie-llama", "reference", key)["files"].items():
        st.get_blob_file(info["sha256"], tmp_path / "ref" / rel, size=info["size"])
    stored = load_outputs(tmp_path / "ref")
    for p in stored["prompts"]:
        assert p[GREEDY_TOP[0]].shape[0] == len(p["generated"]) and p[GREEDY_TOP[0]][:, 0].tolist() == p["generated"]

    ((_, _, vkey),) = st.list_manifests("tie-llama", "validate")
    res = st.get_manifest("tie-llama", "validate", vkey)["results"]
    m, gate = res["metrics"], res["gates"]["greedy_equal_to_near_tie"]
    assert 0 < m["logits_max_abs_diff"] < 0.05  # fp16's own error
    assert m["greedy_tie_margin_used"] == max(DEFAULT_TIE_MARGIN, 2 * m["logits_max_abs_diff"])
    assert gate == {"value": m["greedy_equal_to_near_tie"], "limit": True, "passed": m["greedy_equal_to_near_tie"],
                    "margin": m["greedy_tie_margin_used"]}
    for g in m["greedy"]:
        assert (g["first_divergence"] is None) == g["equal"] and "near_tie_equal" in g
    v = out["variants"]["fp16-tp1"]
    assert v["gates"]["greedy_equal_to_near_tie"]["passed"] and v["validation"] is True
