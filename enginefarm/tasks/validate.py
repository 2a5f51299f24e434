"""validate: the engine against the Hugging Face model on the same inputs.

For each recipe prompt: logits max-abs-diff, top-1 agreement and greedy
tokens (engine vs `generate`). Over the text set (the HF demo's accuracy
mode): perplexity and top-1 / top-5 next-token accuracy, engine next to
reference, plus their logits difference. The recipe's gates decide pass or
fail; the result goes into the manifest (a failed gate is a result, not an
exception: the build is published as `latest` but not `validated`).
"""

from __future__ import annotations

import math
from pathlib import Path


from ..backends import get_backend
from ..backends.base import version_of
from ..errors import BadInput
from ..hashing import code_version, digest_bytes
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


def text_set(name: str, ctx: Ctx) -> str:
    if name == "builtin:eval":
        return (Path(__file__).resolve().parent.parent / "data" / "eval.txt").read_text()
    p = Path(name)
    if not p.is_absolute():
        p = ctx.recipe.recipe_dir() / p
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"recipe {ctx.recipe.name}: validation.text_set {name}: {e}") from None


def spec(ctx: Ctx, fetched: StepResult, built: StepResult, variant: Variant) -> StepSpec:
    v = ctx.recipe.validation
    params = {
        "variant": variant.params(),
        "validation": v.model_dump(mode="json"),
        "text_digest": digest_bytes(text_set(v.text_set, ctx).encode()),
    }
    tc = {"torch": version_of("torch"), "transformers": version_of("transformers")}
    code = code_version(__name__, "enginefarm.runtime.engine")
    return StepSpec("validate", params, {"fetch": fetched, "build": built}, code, tc, variant=variant.name)


def evaluate(ref_model, tok, eng, prompts: list[str], text: str, max_new_tokens: int, max_eval_tokens: int) -> dict:
    """The metrics, engine next to reference."""
    import torch

    eos = tok.eos_token_id
    max_diff = 0.0
    agree = total = 0
    greedy = []
    for prompt in prompts:
        ids = tok(prompt).input_ids
        if not ids:
            raise BadInput(f"validation prompt {prompt!r} encodes to no tokens")
        n_new = min(max_new_tokens, eng.max_seq_len - len(ids))
        with torch.no_grad():
            ref_logits = ref_model(torch.tensor([ids])).logits[0].float()
            ref_gen = ref_model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id,
            )[0, len(ids):].tolist()
        lg = eng.logits(ids)
        max_diff = max(max_diff, float((lg - ref_logits).abs().max()))
        agree += int((lg.argmax(-1) == ref_logits.argmax(-1)).sum())
        total += len(ids)
        got = eng.generate([ids], n_new, eos_token_id=eos)[0]
        greedy.append({"prompt": prompt, "engine": got, "reference": ref_gen, "equal": got == ref_gen})

    toks = tok(text).input_ids[:max_eval_tokens]
    win = eng.max_input_len
    nll = {"engine": 0.0, "reference": 0.0}
    top1 = {"engine": 0, "reference": 0}
    top5 = {"engine": 0, "reference": 0}
    n = 0
    for s in range(0, len(toks) - 1, win):
        chunk = toks[s : s + win + 1]
        if len(chunk) < 2:
            break
        inp, tgt = chunk[:-1], torch.tensor(chunk[1:])
        with torch.no_grad():
            r = ref_model(torch.tensor([inp])).logits[0].float()
        e = eng.logits(inp)
        max_diff = max(max_diff, float((e - r).abs().max()))
        agree += int((e.argmax(-1) == r.argmax(-1)).sum())
        total += len(inp)
        for who, lg in (("engine", e), ("reference", r)):
            nll[who] += float(torch.nn.functional.cross_entropy(lg, tgt, reduction="sum"))
            top1[who] += int((lg.argmax(-1) == tgt).sum())
            top5[who] += int((lg.topk(5, -1).indices == tgt[:, None]).any(-1).sum())
        n += len(inp)
    ppl = {k: math.exp(v / max(n, 1)) for k, v in nll.items()}
    return {
        "logits_max_abs_diff": max_diff,
        "top1_agreement": agree / max(total, 1),
        "greedy": greedy,
        "greedy_equal": all(g["equal"] for g in greedy),
        "eval_tokens": n,
        "perplexity": ppl,
        "perplexity_rel_diff": abs(ppl["engine"] - ppl["reference"]) / ppl["reference"],
        "top1_accuracy": {k: v / max(n, 1) for k, v in top1.items()},
        "top5_accuracy": {k: v / max(n, 1) for k, v in top5.items()},
        "top5_accuracy_drop": (top5["reference"] - top5["engine"]) / max(n, 1),
    }


def judge(metrics: dict, gates: dict) -> dict:
    out = {}
    for name, limit in gates.items():
        if limit is None or limit is False:
            continue
        value = metrics[name]
        if name == "greedy_equal":
            ok = bool(value)
        elif name == "top1_agreement":
            ok = value >= limit
        else:
            ok = value <= limit
        out[name] = {"value": value, "limit": limit, "passed": ok}
    return out


@step_task("validate")
def validate_task(ctx: Ctx, fetched: StepResult, built: StepResult, variant: Variant) -> StepResult:
    s = spec(ctx, fetched, built, variant)

    def work(out: Path, scratch: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = materialize(ctx, fetched, scratch / "src")
        eng_dir = materialize(ctx, built, scratch / "engine")
        v = ctx.recipe.validation
        log(f"validate [{variant.name}]: loading the reference model (fp32) and the engine")
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, trust_remote_code=False).eval()
        eng = get_backend(built.manifest["params"]["backend"]).load(eng_dir)
        metrics = evaluate(ref, tok, eng, v.prompts, text_set(v.text_set, ctx), v.max_new_tokens, v.max_eval_tokens)
        gates = judge(metrics, v.gates.model_dump())
        passed = all(g["passed"] for g in gates.values())
        log(
            f"validate [{variant.name}]: {'PASSED' if passed else 'FAILED'}: "
            + ", ".join(f"{k}={g['value'] if not isinstance(g['value'], float) else round(g['value'], 6)}"
                        f"{'' if g['passed'] else ' (limit ' + str(g['limit']) + ')'}" for k, g in gates.items())
        )
        return {"metrics": metrics, "gates": gates, "passed": passed}, {}

    return run_step(ctx, s, work)
