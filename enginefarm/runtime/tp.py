"""Tensor parallelism: the rank processes, one launcher (`Ranks`) for all.

Every rank is a process (`python -m enginefarm.runtime.tp`), joined in one
torch.distributed process group (gloo on CPU, nccl where each rank has a
GPU); three jobs run in them:

- `run_checkpoints`: proof that the shards of a TensorRT-LLM checkpoint are
  right. Every rank loads only its own `rank{N}.safetensors` into
  runtime/decoder.py's DecoderLM (or, for an encoder-decoder checkpoint, its
  `encoder/` and `decoder/` rank files into runtime/encdec.py's encoder and
  decoder step), which all-reduces after the row-parallel layers (attention
  dense, mlp proj) and all-gathers the vocab-parallel logits, where
  TensorRT-LLM does. The ranks run the validation inputs (token ids; no
  tokenizer, no Hugging Face model code in the ranks) and rank 0 writes the
  logits and greedy tokens, which the caller compares with the Hugging Face
  model (tasks/validate.py's compare). Several checkpoints of the same tp
  size run in one launch.
- `run_ranks`: a caller's function in every rank (the aoti backend's tp
  build: each rank exports and compiles its own packages, since AOTInductor
  resolves the process group of the collectives it compiles).
- `TPEngine`: a built tp engine serving calls (see the class).
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


class Ranks:
    """tp processes of `python -m enginefarm.runtime.tp JOB RANK WORLD PORT DIR`
    joined in one torch.distributed process group, their output logged in
    DIR/rank{N}.log: the one launcher of the farm's rank processes (the
    shards check, the aoti backend's tp builds, tp engines serving calls)."""

    def __init__(self, tp: int, job: dict, tmp: str | Path):
        self.tp, self.tmp = tp, Path(tmp)
        path = self.tmp / "job.json"
        path.write_text(json.dumps(job))
        port = _free_port()
        env = dict(os.environ)
        # tp processes share the machine's cores: one thread each unless told otherwise
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
        self.procs, self.logs = [], []
        for rank in range(tp):
            log = open(self.tmp / f"rank{rank}.log", "w+b")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "enginefarm.runtime.tp", str(path), str(rank), str(tp), str(port), str(self.tmp)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            ))

    def failed(self):
        """(rank, exit code) of the first rank that exited with an error, or None."""
        bad = [(r, p.returncode) for r, p in enumerate(self.procs) if p.poll() not in (None, 0)]
        return bad[0] if bad else None

    def wait(self, timeout: float, what: str) -> None:
        """Until every rank has exited; StepFailed (with the ranks' last log lines) if one fails or time runs out."""
        deadline = time.monotonic() + timeout
        failed = None
        try:
            while any(p.poll() is None for p in self.procs):
                failed = self.failed()
                if failed:
                    break
                if time.monotonic() > deadline:
                    failed = (None, "timeout")
                    break
                time.sleep(0.05)
            else:
                failed = self.failed()
        finally:
            self.kill()
        if failed:
            self.fail(what, *failed, timeout=timeout)
        self.close_logs()

    def fail(self, what: str, rank, rc, timeout: float = 0.0):
        self.kill()
        how = f"timed out after {timeout:.0f} s" if rc == "timeout" else f"rank {rank} exited with {rc}"
        raise StepFailed(f"{what} failed: {how}\n" + self.tails())

    def tails(self, n: int = 6) -> str:
        out = []
        for r, log in enumerate(self.logs):
            try:
                log.flush()
                log.seek(0)
                text = log.read().decode(errors="replace").strip().splitlines()[-n:]
            except ValueError:  # closed
                continue
            if text:
                out.append(f"  rank {r}: " + "\n           ".join(text))
        return "\n".join(out)

    def kill(self, grace: float = 0.0) -> None:
        end = time.monotonic() + grace
        for p in self.procs:
            while p.poll() is None and time.monotonic() < end:
                time.sleep(0.02)
            if p.poll() is None:
                p.kill()
                p.wait()

    def close_logs(self) -> None:
        for log in self.logs:
            log.close()


def _backend_for(tp: int, backend: str) -> str:
    import torch

    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= tp else "gloo"
    return backend


def run_ranks(tp: int, call: str, args: dict, backend: str = "auto", timeout: float = 1800.0, what: str = "") -> object:
    """call ("module:function", the caller's, so this module never imports the
    layers above it) run as function(rank, world, args) in each of tp rank
    processes of one process group; rank 0's return value (torch.save-able)."""
    import torch

    module, _, function = call.partition(":")
    if not module or not function:
        raise BadInput(f"call must name a function as 'module:function', got {call!r}")
    with tempfile.TemporaryDirectory(prefix="enginefarm-tp-") as tmp:
        ranks = Ranks(tp, {"call": call, "args": args, "backend": _backend_for(tp, backend)}, tmp)
        ranks.wait(timeout, what or f"tp {tp} {call}")
        return torch.load(Path(tmp) / "out.pt", weights_only=False)


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
    with tempfile.TemporaryDirectory(prefix="enginefarm-tp-") as tmp:
        ranks = Ranks(tp, {
            "checkpoints": [str(Path(d).resolve()) for d in ckpt_dirs],
            "prompt_ids": prompt_ids, "eval_ids": eval_ids, "max_new_tokens": max_new_tokens, "eos": eos,
            "max_input_len": max_input_len, "max_seq_len": max_seq_len, "backend": _backend_for(tp, backend),
            "outputs": outputs,
        }, tmp)
        ranks.wait(timeout, f"tp {tp} check over {len(ckpt_dirs)} checkpoint(s)")
        return [torch.load(Path(tmp) / f"out{i}.pt") for i in range(len(ckpt_dirs))]


# ----------------------------------------------------------------------------- tp engines


_METHOD = "__enginefarm_tp_method__"  # a rank's answer to "get": the attribute is a method (call it remotely)
_ON_TOKEN = "__enginefarm_tp_on_token__"  # stands for the caller's on_token callback in a call's arguments


class TPEngine:
    """A tp > 1 aoti engine, run as tp rank processes (`Ranks`), each with
    its own rank's packages (engine_dir/rank{N}/), their collectives inside
    the packages. This object, in the caller's process, stands for the
    engine: every method call and attribute read is sent to all ranks, which
    run it in lockstep (the packages' all-reduces join them), and rank 0's
    result comes back. So the validate step, `enginefarm run`, `bench` and
    `chat` drive a tp engine through the same calls as a tp 1 one (a
    multimodal pipeline runs its visual engine here and hands the same
    features to every rank).

    An `on_token` callback (streaming, stop strings) stays here: each rank
    asks for the k-th token's verdict and all get the one answer. A sampling
    request without a seed gets one drawn here, so the ranks draw alike."""

    def __init__(self, engine_dir: str | Path, meta, start_timeout: float = 600.0, call_timeout: float = 3600.0):
        import threading
        import weakref
        from multiprocessing.connection import Listener

        self.engine_dir, self.meta, self.tp = Path(engine_dir), meta, int(meta.tp)
        self._call_timeout = call_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="enginefarm-tp-engine-")
        key = os.urandom(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=key)
        backend = "nccl" if meta.device == "cuda" else "gloo"
        self._ranks = Ranks(self.tp, {"serve": str(self.engine_dir.resolve()), "port": self._listener.address[1],
                                      "authkey": key.hex(), "backend": backend}, self._tmp.name)
        self._conns: dict[int, object] = {}
        self._finalizer = weakref.finalize(self, _shutdown, self._conns, self._ranks, self._listener, self._tmp)

        def accept():
            try:
                while len(self._conns) < self.tp:
                    c = self._listener.accept()
                    self._conns[int(_get(c))] = c
            except (OSError, EOFError):
                pass

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        deadline = time.monotonic() + start_timeout
        while len(self._conns) < self.tp:
            failed = self._ranks.failed()
            if failed or time.monotonic() > deadline:
                try:
                    self._ranks.fail(f"starting the tp {self.tp} engine {self.engine_dir}",
                                     *(failed or (None, "timeout")), timeout=start_timeout)
                finally:
                    self.close()
            time.sleep(0.02)

    def close(self) -> None:
        """Ends the rank processes (also done when this object is collected, or at exit)."""
        self._finalizer()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        v = self._send(("get", name, (), {}))
        if v == _METHOD:
            return lambda *a, **kw: self._send(("call", name, a, kw))
        return v

    def _send(self, msg: tuple):
        import torch
        from multiprocessing.connection import wait

        if not self._finalizer.alive:
            raise StepFailed(f"the tp {self.tp} engine {self.engine_dir} was closed")
        kind, name, args, kwargs = msg
        on_token = None

        def prepare(v):
            nonlocal on_token
            if callable(v) and not isinstance(v, torch.Tensor):
                on_token = v
                return _ON_TOKEN
            if getattr(v, "do_sample", False) and getattr(v, "seed", 0) is None and hasattr(v, "model_copy"):
                return v.model_copy(update={"seed": int(torch.randint(0, 2**62, (1,)))})
            return v

        msg = (kind, name, tuple(prepare(a) for a in args), {k: prepare(v) for k, v in kwargs.items()})
        for c in self._conns.values():
            _put(c, msg)
        rank_of = {id(c): r for r, c in self._conns.items()}
        results: dict[int, tuple] = {}
        verdicts: list[bool] = []
        asked = [0] * self.tp
        deadline = time.monotonic() + self._call_timeout
        try:
            while len(results) < self.tp:
                ready = wait([c for r, c in self._conns.items() if r not in results], timeout=0.5)
                if not ready:
                    failed = self._ranks.failed()
                    if failed or time.monotonic() > deadline:
                        self._ranks.fail(f"the tp {self.tp} engine's {name}", *(failed or (None, "timeout")),
                                         timeout=self._call_timeout)
                    continue
                for c in ready:
                    r = rank_of[id(c)]
                    try:
                        m = _get(c)
                    except EOFError:
                        time.sleep(0.5)
                        self._ranks.fail(f"the tp {self.tp} engine's {name}", *(self._ranks.failed() or (r, "EOF")))
                    if m[0] == "token":  # the k-th token's verdict, asked by every rank: one answer for all
                        k = asked[r]
                        asked[r] += 1
                        if k == len(verdicts):
                            verdicts.append(bool(on_token(m[1], m[2])))
                        _put(c, verdicts[k])
                    else:
                        results[r] = m
        except BaseException:
            self.close()  # ranks left mid-call cannot be joined again
            raise
        bad = [m for r, m in sorted(results.items()) if m[0] == "err"]
        if bad:
            _, kind, text = bad[0]
            if kind == "BadInput":
                raise BadInput(text)
            if kind == "AttributeError":
                raise AttributeError(text)
            raise StepFailed(f"the tp {self.tp} engine's {name}: {kind}: {text}")
        return results[0][1]


def _put(conn, obj) -> None:
    """Plain pickle over the connection: Connection.send's pickler would hand
    tensors over as shared-memory file descriptors, fetched through
    multiprocessing's resource sharer, which these processes (not started by
    multiprocessing) cannot authenticate to."""
    import pickle

    conn.send_bytes(pickle.dumps(obj))


def _get(conn):
    import pickle

    return pickle.loads(conn.recv_bytes())


def _shutdown(conns: dict, ranks: Ranks, listener, tmp) -> None:
    for c in list(conns.values()):
        try:
            _put(c, ("close", "", (), {}))
            c.close()
        except OSError:
            pass
    try:
        listener.close()
    except OSError:
        pass
    ranks.kill(grace=10.0)
    ranks.close_logs()
    tmp.cleanup()


def _to_cpu(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, (list, tuple)):
        return type(v)(_to_cpu(x) for x in v)
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    return v


def _serve(job: dict, rank: int) -> None:
    """One rank of a tp engine: load its packages, then run what the driver (TPEngine) sends."""
    import pickle
    from multiprocessing.connection import Client

    from .engine import load_engine

    conn = Client(("127.0.0.1", job["port"]), authkey=bytes.fromhex(job["authkey"]))
    eng = load_engine(Path(job["serve"]) / f"rank{rank}")
    _put(conn, rank)

    def on_token(i, t):
        _put(conn, ("token", i, t))
        return _get(conn)

    while True:
        try:
            kind, name, args, kwargs = _get(conn)
        except EOFError:
            return
        if kind == "close":
            return
        try:
            if kind == "get":
                v = getattr(eng, name)
                if callable(v):
                    out = _METHOD
                else:
                    try:
                        pickle.dumps(v)
                        out = v
                    except Exception:  # a package runner, say: say what it is
                        out = f"<{type(v).__name__} in rank 0>"
            else:
                args = tuple(on_token if a == _ON_TOKEN else a for a in args)
                kwargs = {k: (on_token if v == _ON_TOKEN else v) for k, v in kwargs.items()}
                out = getattr(eng, name)(*args, **kwargs)
            _put(conn, ("ok", _to_cpu(out) if rank == 0 else None))
        except BadInput as e:
            _put(conn, ("err", "BadInput", str(e)))
        except Exception as e:  # noqa: BLE001 - reported to the driver, which raises it
            _put(conn, ("err", type(e).__name__, str(e)))


def _rank_main(job_path: str, rank: int, world: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: a stuck rank's Python stacks into its log
    job = json.loads(Path(job_path).read_text())
    backend = job["backend"]
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=float(os.environ.get("ENGINEFARM_TP_TIMEOUT", "900"))))
    try:
        if "serve" in job:
            _serve(job, rank)
        elif "call" in job:
            module, _, function = job["call"].partition(":")
            out = getattr(importlib.import_module(module), function)(rank, world, job["args"])
            if rank == 0:
                torch.save(out, Path(out_dir) / "out.pt")
        else:
            _check_checkpoints(job, rank, backend, out_dir)
    finally:
        dist.destroy_process_group()


def _check_checkpoints(job: dict, rank: int, backend: str, out_dir: str) -> None:
    import torch

    from .decoder import DecoderLM
    from .encdec import EncDecEngine, is_encdec_checkpoint, load_encdec
    from .engine import LLMEngine
    from .export import dtype_name
    from .sidecar import Sidecar

    module, _, function = job["outputs"].partition(":")
    engine_outputs = getattr(importlib.import_module(module), function)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
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


if __name__ == "__main__":
    a = argparse.ArgumentParser(description="one rank of a tensor-parallel run (started by runtime.tp.Ranks)")
    a.add_argument("job")
    a.add_argument("rank", type=int)
    a.add_argument("world", type=int)
    a.add_argument("port", type=int)
    a.add_argument("out_dir")
    ns = a.parse_args()
    _rank_main(ns.job, ns.rank, ns.world, ns.port, ns.out_dir)
