"""Proof that the shards of a TensorRT-LLM checkpoint are right.

`run_checkpoints` starts one process per rank (`python -m
enginefarm.runtime.tp`), joined in a torch.distributed process group (gloo
on CPU, nccl where each rank has a GPU). Every rank loads only its own
`rank{N}.safetensors` into runtime/decoder.py's DecoderLM (or, for an
encoder-decoder checkpoint, its `encoder/` and `decoder/` rank files into
runtime/encdec.py's encoder and decoder step), which all-reduces after the
row-parallel layers (attention dense, mlp proj) and all-gathers the
vocab-parallel logits, where TensorRT-LLM does. The ranks run the validation
inputs (token ids; no tokenizer, no Hugging Face model code in the ranks) and
rank 0 writes the logits and greedy tokens, which the caller compares with
the Hugging Face model (tasks/validate.py's compare).

Several checkpoints of the same tp size run in one launch, so a test of every
quantization at one tp size starts its processes once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..errors import BadInput, StepFailed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_tp(ckpt_dir: str | Path) -> int:
    """The tp size of a checkpoint (of an encoder-decoder one: its decoder's, which its encoder shares)."""
    root = Path(ckpt_dir)
    if not (root / "config.json").is_file() and (root / "decoder" / "config.json").is_file():
        root = root / "decoder"
    try:
        cfg = json.loads((root / "config.json").read_text())
        return int(cfg["mapping"]["tp_size"])
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{ckpt_dir} is not a TensorRT-LLM checkpoint (config.json with mapping.tp_size): {e}") from None


def run_checkpoints(
    ckpt_dirs: list[str | Path],
    prompt_ids: list[list[int]],
    eval_ids: list[int],
    max_new_tokens: int,
    eos: Optional[int],
    max_input_len: int,
    max_seq_len: int,
    outputs: str,
    backend: str = "auto",
    timeout: float = 600.0,
) -> list[dict]:
    """What `outputs` ("module:function", called in every rank as
    function(engine, prompt_ids, eval_ids, max_new_tokens, eos); the caller's,
    e.g. evaluation.engine_outputs, so this module never imports the layers
    above it) gives for each checkpoint, all of one tp size, run as tp
    processes; rank 0's result is returned."""
    module, _, function = outputs.partition(":")
    if not module or not function:
        raise BadInput(f"outputs must name a function as 'module:function', got {outputs!r}")
    import torch

    if not ckpt_dirs:
        return []
    tps = {checkpoint_tp(d) for d in ckpt_dirs}
    if len(tps) != 1:
        raise BadInput(f"run_checkpoints takes checkpoints of one tp size, got {sorted(tps)}")
    tp = tps.pop()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= tp else "gloo"
    with tempfile.TemporaryDirectory(prefix="enginefarm-tp-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({
            "checkpoints": [str(Path(d).resolve()) for d in ckpt_dirs],
            "prompt_ids": prompt_ids, "eval_ids": eval_ids, "max_new_tokens": max_new_tokens, "eos": eos,
            "max_input_len": max_input_len, "max_seq_len": max_seq_len, "backend": backend,
            "outputs": outputs,
        }))
        port = _free_port()
        env = dict(os.environ)
        # tp processes share the machine's cores: one thread each unless told otherwise
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
        procs = []
        logs = []
        for rank in range(tp):
            log = open(Path(tmp) / f"rank{rank}.log", "w+b")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "enginefarm.runtime.tp", str(job), str(rank), str(tp), str(port), tmp],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            ))
        deadline = time.monotonic() + timeout
        failed = None
        try:
            while any(p.poll() is None for p in procs):
                bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
                if bad:
                    failed = bad[0]
                    break
                if time.monotonic() > deadline:
                    failed = (None, "timeout")
                    break
                time.sleep(0.05)
            else:
                bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
                failed = bad[0] if bad else None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failed:
            rank, rc = failed
            tails = []
            for r, log in enumerate(logs):
                log.seek(0)
                text = log.read().decode(errors="replace").strip().splitlines()[-6:]
                if text:
                    tails.append(f"  rank {r}: " + "\n           ".join(text))
            what = f"timed out after {timeout:.0f} s" if rc == "timeout" else f"rank {rank} exited with {rc}"
            raise StepFailed(f"tp {tp} check over {len(ckpt_dirs)} checkpoint(s) failed: {what}\n" + "\n".join(tails))
        for log in logs:
            log.close()
        return [torch.load(Path(tmp) / f"out{i}.pt") for i in range(len(ckpt_dirs))]


def _rank_main(job_path: str, rank: int, world: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from .decoder import DecoderLM
    from .encdec import EncDecEngine, is_encdec_checkpoint, load_encdec
    from .engine import LLMEngine
    from .export import dtype_name
    from .sidecar import Sidecar

    job = json.loads(Path(job_path).read_text())
    module, _, function = job["outputs"].partition(":")
    engine_outputs = getattr(importlib.import_module(module), function)
    backend = job["backend"]
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    try:
        for i, ckpt in enumerate(job["checkpoints"]):
            limits = {"device": "cuda" if device != "cpu" else "cpu", "max_batch_size": 1,
                      "max_input_len": job["max_input_len"], "max_seq_len": job["max_seq_len"]}
            if is_encdec_checkpoint(ckpt):
                encoder, model = load_encdec(ckpt, rank=rank, allow_tp=True)
                eng = EncDecEngine.from_modules(encoder.to(device), model.to(device), limits)
            else:
                model = DecoderLM.from_checkpoint(ckpt, rank=rank, allow_tp=True).to(device)
                c = model.cfg
                eng = LLMEngine(model, Sidecar(
                    format="aoti-pt2", dtype=dtype_name(model.embed.dtype), vocab_size=c.vocab_size,
                    cache_shape=[c.num_layers, 1, c.kv_heads_per_rank, job["max_seq_len"], c.head_size], **limits))
            with torch.no_grad():
                out = engine_outputs(eng, job["prompt_ids"], job["eval_ids"], job["max_new_tokens"], job["eos"])
            if rank == 0:
                torch.save(out, Path(out_dir) / f"out{i}.pt")
            del model, eng
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    a = argparse.ArgumentParser(description="one rank of a tensor-parallel checkpoint check (started by run_checkpoints)")
    a.add_argument("job")
    a.add_argument("rank", type=int)
    a.add_argument("world", type=int)
    a.add_argument("port", type=int)
    a.add_argument("out_dir")
    ns = a.parse_args()
    _rank_main(ns.job, ns.rank, ns.world, ns.port, ns.out_dir)
