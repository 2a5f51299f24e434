"""Conversion throughput and memory at a real size, against `cp`.

Writes a synthetic OPT-2.7B-shaped Hugging Face checkpoint (random fp16
weights, two safetensors shards + index, written tensor by tensor), then, in
the same run and from a warm page cache, times

    cp -r SRC DST                                    (the baseline)
    enginefarm convert SRC --tp T [--quant w8a16] --out DIR

for tp 1 and 4, fp16 and W8A16, as whole commands. Throughput is source
bytes per second; the ratio is convert throughput / cp throughput (goals at
tp 4: fp16 >= 0.70, W8A16 >= 0.40). Peak anonymous memory (RssAnon, polled
from /proc: memory-mapped file pages do not count) of each convert process is
printed next to it (goal < 1.5 GB).

    .venv/bin/python bench/convert.py [--layers 32] [--repeat 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(dest: Path, layers: int, hidden: int = 2560, ffn: int = 10240, vocab: int = 50272,
                     heads: int = 32, positions: int = 2048, shards: int = 2) -> int:
    """An OPT-shaped checkpoint with random fp16 weights; returns its weight bytes."""
    import torch

    from enginefarm.checkpoint import SafetensorsWriter

    dest.mkdir(parents=True)
    p = "model.decoder."
    tensors = [(p + "embed_tokens.weight", (vocab, hidden)), (p + "embed_positions.weight", (positions + 2, hidden))]
    for i in range(layers):
        s = f"{p}layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors += [(s + f"self_attn.{n}.weight", (hidden, hidden)), (s + f"self_attn.{n}.bias", (hidden,))]
        tensors += [(s + "fc1.weight", (ffn, hidden)), (s + "fc1.bias", (ffn,)),
                    (s + "fc2.weight", (hidden, ffn)), (s + "fc2.bias", (hidden,))]
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            tensors += [(s + f"{n}.weight", (hidden,)), (s + f"{n}.bias", (hidden,))]
    tensors += [(p + "final_layer_norm.weight", (hidden,)), (p + "final_layer_norm.bias", (hidden,))]
    per = (len(tensors) + shards - 1) // shards
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for k in range(shards):
        part = tensors[k * per : (k + 1) * per]
        fn = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        w = SafetensorsWriter(dest / fn, [(n, torch.float16, sh) for n, sh in part], {"format": "pt"})
        for n, sh in part:
            t = (torch.randn(sh, generator=g) * 0.02).to(torch.float16)
            w.write(n, t)
            total += t.numel() * 2
            weight_map[n] = fn
        w.close()
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (dest / "config.json").write_text(json.dumps({
        "model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": hidden, "ffn_dim": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "vocab_size": vocab,
        "max_position_embeddings": positions, "word_embed_proj_dim": hidden, "do_layer_norm_before": True,
        "activation_function": "relu", "enable_bias": True, "torch_dtype": "float16",
    }))
    return total


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RssAnon (bytes) of a command."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    status = Path(f"/proc/{p.pid}/status")
    while p.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.1)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.read().decode()[-2000:]}")
    return dt, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="32 = OPT-2.7B")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch directory (needs ~3x the checkpoint size free)")
    ap.add_argument("--cases", default="fp16-tp1,fp16-tp4,w8a16-tp1,w8a16-tp4")
    a = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="enginefarm-bench-convert-", dir=a.dir))
    try:
        src = scratch / "src"
        t0 = time.perf_counter()
        size = write_checkpoint(src, a.layers)
        print(f"synthetic OPT checkpoint: {a.layers} layers, {size / 1e9:.2f} GB fp16, written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        cli = [str(Path(sys.executable).parent / "enginefarm"), "convert", str(src), "--quiet"]
        cases = {"cp": ["cp", "-r", str(src), str(scratch / "out")]}
        for c in a.cases.split(","):
            q, tp = c.split("-tp")
            cases[c] = cli + ["--tp", tp, "--out", str(scratch / "out")] + ([] if q == "fp16" else ["--quant", q])
        subprocess.run(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL)  # warm the page cache
        times: dict[str, list[float]] = {k: [] for k in cases}
        peaks: dict[str, int] = {k: 0 for k in cases}
        for r in range(a.repeat):
            for name, cmd in cases.items():  # interleaved, so drift hits every case alike
                dt, peak = timed(cmd)
                shutil.rmtree(scratch / "out")
                times[name].append(dt)
                peaks[name] = max(peaks[name], peak)
                print(f"  run {r + 1} {name:10s} {dt:7.2f} s  peak RssAnon {peak / 2**20:7.0f} MiB", flush=True)
        base = statistics.median(times["cp"])
        print(f"\n{'case':10s} {'median s':>9s} {'GB/s':>6s} {'vs cp':>6s} {'peak RssAnon':>13s}")
        for name in cases:
            m = statistics.median(times[name])
            print(f"{name:10s} {m:9.2f} {size / m / 1e9:6.2f} {base / m:6.2f} {peaks[name] / 2**20:9.0f} MiB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
