"""The aoti fp16 (and W8A16) engine against gpt-fast on the same random
LLaMA-7B weights, in one run.

gpt-fast (github.com/pytorch-labs/gpt-fast) is not part of this repository:
copy its scripts next to this run (they are fetched, never committed), e.g.

    git -C <gpt-fast checkout> archive HEAD model.py generate.py tokenizer.py quantize.py tp.py | tar -x -C DIR

and give DIR as --gptfast. The weights are made here (random fp16, seeded,
on the GPU), written once in gpt-fast's checkpoint layout (its
convert_hf_checkpoint.py's names and q/k permutation) next to a small
SentencePiece tokenizer trained here, and gpt-fast runs as its README says:

    python generate.py --compile --checkpoint_path CKPT/7B/model.pth --prompt "Hello, my name is"
    python quantize.py --checkpoint_path CKPT/7B/model.pth --mode int8   (then generate with model_int8.pth)

Its "Average tokens/sec" counts new tokens over the whole generation
(prefill included, bf16: its fixed precision); the engine's figure is
computed the same way on the same prompt length and token count, next to
its decode-only rate.

    python bench/gpu_gptfast.py --out DIR --gptfast DIR [--int8] [--prebuilt DIR]
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import Results, log, table  # noqa: E402

PROMPT = "Hello, my name is"


def gptfast_state(hf) -> dict:
    """gpt-fast's names for a Hugging Face LLaMA's tensors (its converter's mapping)."""
    c = hf.config
    n_head, dim = c.num_attention_heads, c.hidden_size
    head_dim = dim // n_head

    def permute(w):
        return w.view(n_head, 2, head_dim // 2, dim).transpose(1, 2).reshape(head_dim * n_head, dim)

    sd = hf.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention.wqkv.weight"] = torch.cat([permute(sd[p + "self_attn.q_proj.weight"]),
                                                      permute(sd[p + "self_attn.k_proj.weight"]),
                                                      sd[p + "self_attn.v_proj.weight"]])
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def train_tokenizer(dest: Path, vocab: int = 32000) -> None:
    """A SentencePiece model of the model's vocabulary size (gpt-fast decodes every
    generated id; a random model generates any of them): a small BPE learnt from
    the farm's eval text, padded with placeholder pieces up to `vocab`."""
    import sentencepiece as spm

    text = (Path(__file__).resolve().parent.parent / "enginefarm" / "data" / "eval.txt").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in text if t.strip()] * 4),
                                   model_prefix=str(dest / "tokenizer"), vocab_size=vocab, model_type="bpe",
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=True, minloglevel=2,
                                   user_defined_symbols=[f"<t{i}>" for i in range(vocab - 400)])


def run_gptfast(gdir: Path, ckpt: Path, new_tokens: int, samples: int, timeout: float, prompt=PROMPT) -> dict:
    """gpt-fast's generate.py as its README runs it (--compile); `prompt` a text or a
    token count (its synthetic prompt of that length)."""
    cmd = [sys.executable, "generate.py", "--compile", "--checkpoint_path", str(ckpt), "--prompt", str(prompt),
           "--max_new_tokens", str(new_tokens), "--num_samples", str(samples)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=gdir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"command": " ".join(cmd[1:]), "rc": "timeout", "wall_s": round(time.perf_counter() - t0, 1),
                "tail": str((e.stdout or b"")[-1500:])}
    out = p.stdout + p.stderr
    r = {"command": " ".join(cmd[1:]), "rc": p.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    m = re.search(r"Average tokens/sec: ([\d.]+)", out)
    r["tokens_per_s"] = float(m.group(1)) if m else None
    m = re.search(r"Compilation time: ([\d.]+)", out)
    r["compile_s"] = float(m.group(1)) if m else None
    m = re.search(r"Bandwidth achieved: ([\d.]+)", out)
    r["bandwidth_GBps_reported"] = float(m.group(1)) if m else None
    m = re.search(r"Prompt Length: (\d+)", out)
    r["prompt_len"] = int(m.group(1)) if m else None
    if p.returncode:
        r["tail"] = out[-2500:]
    return r


def write_checkpoint(hf, dest: Path) -> Path:
    """The Hugging Face model's weights in gpt-fast's layout (bf16, its fixed
    precision) as DEST/7B/model.pth, with a SentencePiece tokenizer beside it."""
    ck = dest / "7B"
    ck.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.bfloat16).cpu() for k, v in gptfast_state(hf).items()}, ck / "model.pth")
    train_tokenizer(ck)
    return ck / "model.pth"


def engine_rate(eng, prompt, new_tokens: int, samples: int) -> dict:
    """The engine's rate counted as gpt-fast counts its own: new tokens over the
    whole generation (prefill included), mean of `samples`; and decode-only."""
    eng.generate_ids(prompt, new_tokens)
    tps, dec = [], []
    for _ in range(samples):
        ev = {}
        eng.generate_ids(prompt, new_tokens, events=ev)
        ev["end"].synchronize()
        tps.append(new_tokens / (ev["start"].elapsed_time(ev["end"]) / 1000))
        dec.append(1000 / (ev["first"].elapsed_time(ev["end"]) / (new_tokens - 1)))
    return {"prompt_len": prompt.shape[1], "new_tokens": new_tokens, "tokens_per_s": round(sum(tps) / len(tps), 2),
            "decode_tokens_per_s": round(sorted(dec)[len(dec) // 2], 2)}


def greedy_check(hf, eng, prompt, n: int) -> dict:
    """Greedy tokens of the fp16 engine against eager Hugging Face on one prompt; at
    the first difference, eager's own logits there: the gap between its top token and
    the engine's (a near-tie that fp16 rounding order decides, or a real error)."""
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, prompt.shape[1]:].tolist()
        ours = eng.generate_ids(prompt, n)[0].tolist()
        r = {"new_tokens": n, "equal": ours == ref}
        i = next((k for k, (x, y) in enumerate(zip(ours, ref)) if x != y), None)
        r["first_diff"] = i
        if i is not None:
            ctx = torch.cat([prompt[0], torch.tensor(ref[:i], device=prompt.device)])[None]
            lg = hf(ctx).logits[0, -1].float()
            top2 = lg.topk(2)
            r["eager_gap_top1_vs_engine_token"] = round((lg[ref[i]] - lg[ours[i]]).item(), 5)
            r["eager_gap_top1_top2"] = round((top2.values[0] - top2.values[1]).item(), 5)
            r["eager_logit_std"] = round(lg.std().item(), 5)
    return r


def main():
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--gptfast", required=True, help="directory holding gpt-fast's model.py, generate.py, ...")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=16, help="gpt-fast's synthetic prompt of this many tokens")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--int8", action="store_true", help="also gpt-fast int8 against the W8A16 engine")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prebuilt", help="packages compiled earlier by bench/gpu_llm.py children (DIR/none/engine.decode.json)")
    a = ap.parse_args()
    from bench.gpu_llm import compile_all, engine_from_parts
    from bench.models import decoder_from_hf, hf_llama, llama_state
    from enginefarm.runtime.swaps import prepare_engine

    res = Results(a.out, "gptfast")
    log(res["env"])
    quants = ["none"] + (["w8a16"] if a.int8 else [])
    limits = {"max_batch_size": 1, "max_input_len": 64, "max_seq_len": 256}
    if a.prebuilt:
        work = Path(a.prebuilt)
    else:  # compiles first: they would disturb gpt-fast's timing
        work = Path(tempfile.mkdtemp(prefix="gf-engines-"))
        compile_all(work, a.layers, limits, [(q, "decode") for q in quants], 2, 500)
    hf = hf_llama(layers=a.layers)
    t0 = time.perf_counter()
    ckpt = write_checkpoint(hf, Path(tempfile.mkdtemp(prefix="gf-ckpt-")))
    log(f"gpt-fast checkpoint written in {time.perf_counter() - t0:.0f}s")
    gdir = Path(a.gptfast).resolve()
    rows = []
    r = run_gptfast(gdir, ckpt, a.new_tokens, a.samples, 400, prompt=a.prompt_len)
    rows.append({"engine": "gpt-fast bf16 (compile)", **r})
    res["rows"] = rows
    log({k: v for k, v in r.items() if k != "tail"})
    if r.get("tail"):
        log(r["tail"])
    if a.int8:
        q = subprocess.run([sys.executable, "quantize.py", "--checkpoint_path", str(ckpt), "--mode", "int8"],
                           cwd=gdir, capture_output=True, text=True, timeout=600)
        if q.returncode == 0:
            r = run_gptfast(gdir, ckpt.parent / "model_int8.pth", a.new_tokens, a.samples, 400, prompt=a.prompt_len)
            rows.append({"engine": "gpt-fast int8 (compile)", **r})
        else:
            rows.append({"engine": "gpt-fast int8", "error": (q.stdout + q.stderr)[-2000:]})
        res["rows"] = rows
    # the farm's engines on the same weights, the same prompt length and token count, counted the same way
    torch.manual_seed(7)
    prompt = torch.randint(3, 32000, (1, a.prompt_len), device="cuda")
    state, cfgd = llama_state(hf), hf.config.to_dict()
    for qn in quants:
        try:
            m = prepare_engine(decoder_from_hf(cfgd, state, qn))
            eng = engine_from_parts(work / qn, m, qn)
            e = engine_rate(eng, prompt, a.new_tokens, a.samples)
            rows.append({"engine": f"aoti {'fp16' if qn == 'none' else 'W8A16'}", **e})
            if qn == "none":
                res["greedy_vs_eager"] = greedy_check(hf, eng, prompt, 128)
                log("greedy fp16 engine vs eager HF:", res["greedy_vs_eager"])
            del eng, m
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            import traceback

            rows.append({"engine": f"aoti {qn}", "error": traceback.format_exc()[-2000:]})
            log(rows[-1]["error"])
        res["rows"] = rows
    gf = {x["engine"]: x.get("tokens_per_s") for x in rows}
    for x in rows:
        base = gf.get("gpt-fast bf16 (compile)") if x["engine"] == "aoti fp16" else gf.get("gpt-fast int8 (compile)")
        if base and x.get("tokens_per_s") and x["engine"].startswith("aoti"):
            x["vs_gptfast"] = round(x["tokens_per_s"] / base, 2)
    res["rows"] = rows
    log(table(rows, ["engine", "prompt_len", "tokens_per_s", "decode_tokens_per_s", "vs_gptfast", "compile_s",
                     "bandwidth_GBps_reported", "rc"]))
    log(f"GPU {res['env'].get('gpu')}, {res['env']['date_utc']}; elapsed {res.elapsed():.0f}s")


if __name__ == "__main__":
    main()
