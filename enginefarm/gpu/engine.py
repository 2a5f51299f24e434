"""Running a built engine: greedy generation and scoring from the package
alone (no Hugging Face model code on this path).

An LLM engine (backends/aoti.py) has a general step package (prefill), on
CUDA a decode package, and its weights in one file that both share. With
`cuda_graphs` (recipe option `aoti.cuda_graphs`, or `LLMEngine.load(...,
cuda_graphs=True)`), each decode step is one CUDA-graph replay per batch
size: the package's call, the greedy pick and the feedback of the token
into the next step's input are captured once and replayed; the caches are
the engine's own, one pair per batch size, written in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BadInput, NotAvailable
from ..runtime.decoding import GREEDY, Decoding, OnToken, replay
from ..runtime.engine import EngineBase

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_STDCXX_GLOBAL = False


def _global_libstdcxx() -> None:
    """Make the process's libstdc++ global before loading a package.

    A package's wrapper library built by a compiler that links parts of
    libstdc++ into it (seen: a toolchain in /opt/gcc on the GPU machines) binds
    to its own copy unless libstdc++ is in the global scope, and then crashes
    in std::regex when handed a std::locale made by the other copy (AOTI's
    device-string parsing, at load). Promoting the already loaded library to
    RTLD_GLOBAL gives the package the process's one copy."""
    global _STDCXX_GLOBAL
    if _STDCXX_GLOBAL:
        return
    import ctypes

    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass
    _STDCXX_GLOBAL = True


def _load_runner(path: Path):
    """A package's runner. Single-threaded: the default runner keeps a pool of
    model instances and waits on an event of the previous call before the
    next, which CUDA-graph capture forbids (seen: 'operation not permitted
    when stream is capturing'); the engines call from one thread anyway."""
    _global_libstdcxx()
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)


def load_weights(runners: list, weights_file: Path, device: str) -> dict:
    """The weights file into device memory, handed to every runner (user-managed:
    the runners share these tensors, nothing is copied)."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt", device=device if device != "cuda" else "cuda:0") as f:
        consts = {k: f.get_tensor(k) for k in f.keys()}
    for r in runners:
        need = set(r.get_constant_fqns())
        missing = need - set(consts)
        if missing:
            raise BadInput(f"{weights_file}: no tensors for {sorted(missing)[:4]}... (the package needs them)")
        r.load_constants({k: consts[k] for k in need}, check_full_update=True, user_managed=True)
    return consts


class _DecodeGraph:
    """One captured decode step for a batch size: replay() runs the step on
    `ids` at `pos`, writes the greedy tokens back into `ids` and advances `pos`."""

    def __init__(self, run, batch: int, kc, vc, device: str):
        # run(ids, pos, kc, vc) -> logits
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.kc, self.vc = kc, vc
        self.run = run
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: lazy module loads and workspaces happen outside the capture
                self._body(advance=False)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body(advance=True)

    def _body(self, advance: bool):
        logits = self.run(self.ids, self.pos, self.kc, self.vc)
        if advance:
            self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            self.pos.add_(1)
        return logits

    def replay(self):
        self.graph.replay()


class LLMEngine(EngineBase):
    def __init__(self, runner, sidecar: dict, decode_runner=None, cuda_graphs: bool = False, weights=None):
        self.run = runner
        self.decode_run = decode_runner
        self.meta = sidecar
        self.device = sidecar.get("device", "cpu")
        self.dtype = DTYPES[sidecar["dtype"]]
        L, _, KV, S, D = sidecar["cache_shape"]
        self.cache_dims = (L, KV, S, D)
        self.cuda_graphs = bool(cuda_graphs) and self.device == "cuda"
        self.weights = weights  # keeps user-managed constants alive
        self.per_layer = sidecar.get("version", 1) >= 2  # packages take per-layer cache tensors
        self._caches: dict[int, tuple] = {}
        self._views: dict[int, tuple] = {}
        self._graphs: dict[int, _DecodeGraph] = {}

    @classmethod
    def load(cls, engine_dir: str | Path, cuda_graphs: bool | None = None) -> "LLMEngine":
        engine_dir = Path(engine_dir)
        meta = json.loads((engine_dir / "engine.json").read_text())
        if meta.get("format") != "aoti-pt2":
            raise BadInput(f"{engine_dir} holds a {meta.get('format')} engine, not an aoti package")
        if meta.get("device") == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"engine in {engine_dir} was built for {meta.get('target')}; this machine has no CUDA GPU")
        files = meta.get("files") or {"general": meta["file"]}
        runner = _load_runner(engine_dir / files["general"]) if "general" in files else None
        decode = _load_runner(engine_dir / files["decode"]) if "decode" in files else None
        weights = None
        if "weights" in files:
            weights = load_weights([r for r in (runner, decode) if r is not None], engine_dir / files["weights"],
                                   meta.get("device", "cpu"))
        if cuda_graphs is None:
            cuda_graphs = (meta.get("options") or {}).get("cuda_graphs", False)
        return cls(runner, meta, decode, cuda_graphs, weights)

    def _check(self, batch: int, n_in: int, n_new: int = 0) -> None:
        self._check_batch_and_input(batch, n_in)
        if n_in + n_new > self.max_seq_len:
            raise BadInput(
                f"{n_in} prompt tokens + {n_new} new tokens exceed the engine's max_seq_len {self.max_seq_len}"
            )

    def _layers(self, t: torch.Tensor) -> list:
        v = self._views.get(id(t))
        if v is None or v[0] is not t:
            v = self._views[id(t)] = (t, list(t.unbind(0)))
        return v[1]

    def call(self, runner, ids, pos, kc, vc, prompt_table=None):
        """One package call with device tensors; returns the logits."""
        if not self.per_layer:  # a model, or a version-1 package: whole caches in and out
            out = runner(ids, pos, kc, vc)
            return out[0]
        flat = [ids, pos, *self._layers(kc), *self._layers(vc)]
        if prompt_table is not None:
            flat.append(prompt_table)
        loader = getattr(runner, "loader", None)
        out = loader.boxed_run(flat) if loader is not None else runner(*flat[:2], flat[2:2 + len(kc)],
                                                                       flat[2 + len(kc):2 + 2 * len(kc)], *flat[2 + 2 * len(kc):])
        return out[0]

    def step(self, ids: torch.Tensor, start: int, kc, vc, prompt_table=None):
        """One step: logits [B, T, vocab]; the caches are written in place and returned."""
        ids = ids.to(self.device)
        if self.run is None and ids.shape[1] > 1:  # a decode-only engine: the prompt one token at a time
            for t in range(ids.shape[1]):
                lg, _, _ = self.step(ids[:, t:t + 1].clone(), start + t, kc, vc)  # a slice may be misaligned: the package would copy it
            return lg, kc, vc
        pos = torch.tensor([start], dtype=torch.long, device=self.device)
        if prompt_table is not None:
            lg = self.call(self.run, ids, pos, kc, vc, prompt_table.to(self.device, self.dtype))
        elif ids.shape[1] == 1 and self.decode_run is not None:
            lg = self.call(self.decode_run, ids, pos, kc, vc)
        elif self.meta.get("prompt_table_rows"):
            dummy = torch.zeros(1, self.meta["hidden_size"], dtype=self.dtype, device=self.device)
            lg = self.call(self.run, ids, pos, kc, vc, dummy)
        else:
            lg = self.call(self.run, ids, pos, kc, vc)
        return lg, kc, vc

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[T, vocab] logits for one sequence (a prefill)."""
        self._check(1, len(ids))
        kc, vc = self.new_cache(1)
        lg, _, _ = self.step(torch.tensor([ids], dtype=torch.long), 0, kc, vc)
        return lg[0].float().cpu()

    # ------------------------------------------------------------------ generation

    def _decode_graph(self, batch: int) -> _DecodeGraph:
        g = self._graphs.get(batch)
        if g is None:
            kc, vc = self.cache(batch)
            runner = self.decode_run or self.run
            extra = None
            if self.decode_run is None and self.meta.get("prompt_table_rows"):
                extra = torch.zeros(1, self.meta["hidden_size"], dtype=self.dtype, device=self.device)

            def run(ids, pos, k, v):
                return self.call(runner, ids, pos, k, v, extra)

            g = self._graphs[batch] = _DecodeGraph(run, batch, kc, vc, self.device)
        return g

    @torch.no_grad()
    def generate_ids(self, ids: torch.Tensor, max_new_tokens: int, prompt_table=None, events: dict | None = None):
        """Greedy continuation of a batch of equal-length prompts, all on the
        device, no host synchronisation per token (no end-of-sequence test):
        [B, T] -> [B, max_new_tokens]. With `events`, records CUDA events
        'start', 'first' (after the first token) and 'end' into it."""
        B, T = ids.shape
        self._check(B, T, max_new_tokens)
        cuda = self.device == "cuda"
        mark = (lambda k: events.__setitem__(k, _event())) if (events is not None and cuda) else (lambda k: None)
        kc, vc = self.cache(B)
        graph = self._decode_graph(B) if self.cuda_graphs and max_new_tokens > 1 else None
        mark("start")
        lg, _, _ = self.step(ids, 0, kc, vc, prompt_table)
        nxt = lg[:, -1].argmax(-1, keepdim=True)
        out = [nxt]
        mark("first")
        if graph is not None:
            graph.ids.copy_(nxt)
            graph.pos.fill_(T)
            for _ in range(max_new_tokens - 1):
                graph.replay()
                out.append(graph.ids.clone())
        else:
            pos = T
            for _ in range(max_new_tokens - 1):
                lg, _, _ = self.step(nxt, pos, kc, vc)
                nxt = lg[:, -1].argmax(-1, keepdim=True)
                out.append(nxt)
                pos += 1
        mark("end")
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None,
                 decoding: Decoding = GREEDY, on_token: OnToken | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt. Prompts of equal length run as
        one batch; others run one after another. Only greedy decoding (its
        caches are written in place, so beams cannot be reordered);
        on_token sees each output once it is complete."""
        if not decoding.greedy:
            raise NotAvailable("the GPU engine form (components.llm.aoti) decodes greedily only; sampling and beam "
                               "search run on the plain aoti engine")
        return replay(self._greedy(prompts, max_new_tokens, eos_token_id), on_token)

    def _greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
        if not prompts:
            return []
        self._check(len(prompts), max(len(p) for p in prompts), max_new_tokens)
        groups = self._prompts_by_length(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        for n, idx in groups.items():
            ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
            if eos_token_id is None:
                toks = self.generate_ids(ids, max_new_tokens).cpu().tolist()
                for j, i in enumerate(idx):
                    out[i] = toks[j]
                continue
            kc, vc = self.new_cache(len(idx))
            lg, kc, vc = self.step(ids, 0, kc, vc)
            done = torch.zeros(len(idx), dtype=torch.bool)
            pos = n
            for _ in range(max_new_tokens):
                nxt = lg[:, -1].argmax(-1).cpu()
                for j, i in enumerate(idx):
                    if not done[j]:
                        out[i].append(int(nxt[j]))
                done |= nxt == eos_token_id
                if bool(done.all()) or len(out[idx[0]]) >= max_new_tokens:
                    break
                lg, kc, vc = self.step(nxt[:, None], pos, kc, vc)
                pos += 1
        return out


def _event():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e
