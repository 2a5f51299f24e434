"""Running a built engine: generation (greedy, sampling, beam search:
runtime/decoding.py) and scoring from the package alone (no Hugging Face
model code on this path), and `load_engine`, which loads any built engine
as its sidecar (runtime/sidecar.py) says.

An LLM engine (runtime/export.py) has a general step package (prefill), on
CUDA a decode package, and, with both, its weights in one file that both
share. With `cuda_graphs` (recipe option `aoti.cuda_graphs`, or
`LLMEngine.load(..., cuda_graphs=True)`), each greedy decode step is one
CUDA-graph replay per batch size: the package's call, the greedy pick and
the feedback of the token into the next step's input are captured once and
replayed; the caches are the engine's own, one pair per batch size, written
in place.

An engine built for a multimodal recipe takes a prompt table (the visual
features, [rows, hidden]); token ids >= vocab_size select its rows."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import BadInput
from ..quant import engine_cannot_run
from . import sidecar as sc
from .decoding import GREEDY, Decoding, OnToken, decode

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


def check_runs_here(engine_dir, meta: sc.Sidecar) -> None:
    """An aoti engine that this machine can run."""
    if meta.format != "aoti-pt2":
        raise BadInput(f"{engine_dir} holds a {meta.format} engine, not an aoti package")
    if meta.device == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"engine in {engine_dir} was built for {meta.target}; this machine has no CUDA GPU")
    why = engine_cannot_run(getattr(meta, "act_quant", None), meta.device)
    if why:
        raise BadInput(f"engine in {engine_dir}: pending (no compatible GPU): {why}")


def check_rank(engine_dir, meta: sc.Sidecar) -> None:
    """One rank's packages load only in that rank of a process group of the engine's tp size."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world != meta.tp or rank != meta.tp_rank:
        raise BadInput(f"{engine_dir} is rank {meta.tp_rank} of a tp {meta.tp} engine: it runs in rank "
                       f"{meta.tp_rank} of a process group of {meta.tp} (load the engine's own directory, "
                       f"which starts the ranks), not in rank {rank} of {world}")


def load_runner(path: Path, collectives: bool = False):
    """A package's runner. Single-threaded: the default runner keeps a pool of
    model instances and waits on an event of the previous call before the
    next, which CUDA-graph capture forbids (seen: 'operation not permitted
    when stream is capturing'); the engines call from one thread anyway.
    collectives: a tp rank's package (its all-reduces inside): a runner that
    lets go of the GIL while the package runs (GilFreeRunner)."""
    _global_libstdcxx()
    if collectives:
        return GilFreeRunner(path)
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)


class GilFreeRunner:
    """A CPU package's model run through its C ABI (AOTInductorModelContainer*,
    torch/csrc/inductor/aoti_runtime/interface.h) by ctypes, which releases
    the GIL during the call. The packages of a tp rank need that: torch's
    Python runner holds the GIL through the whole package, and a gloo worker
    thread that finishes an all-reduce of the package takes the GIL to free
    the work's tensors (seen in gdb: c10d::ProcessGroupGloo::AsyncWork's
    destructor -> TensorImpl::decref_pyobject -> gil_scoped_acquire) while
    holding the work queue's lock: the package then waits forever for its
    next all-reduce. The weights are inside the package's library (the
    default, package_constants_in_so), so the container needs nothing else;
    `loader.boxed_run(flat inputs)` and `runner(*args)` as torch's runner."""

    def __init__(self, path: Path):
        import ctypes
        import shutil
        import tempfile
        import weakref
        import zipfile

        self._dir = tempfile.mkdtemp(prefix="enginefarm-aoti-")
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        with zipfile.ZipFile(path) as z:
            libs = [n for n in z.namelist() if n.endswith(".so")]
            if len(libs) != 1:
                raise BadInput(f"{path}: {len(libs)} libraries in the package, one expected (a CPU package)")
            lib = z.extract(libs[0], self._dir)
        self._lib = ctypes.CDLL(lib)
        self._handle = ctypes.c_void_p()
        self._check(self._lib.AOTInductorModelContainerCreateWithDevice(
            ctypes.byref(self._handle), ctypes.c_size_t(1), b"cpu", None), "create")
        n = ctypes.c_size_t()
        self._check(self._lib.AOTInductorModelContainerGetNumOutputs(self._handle, ctypes.byref(n)), "outputs")
        self._n_out = n.value
        self.loader = self
        weakref.finalize(self, self._lib.AOTInductorModelContainerDelete, self._handle)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"AOTInductor model container: {what} failed (code {rc})")

    def boxed_run(self, flat: list) -> list:
        import ctypes

        caps = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(flat)  # new handles; the run steals them
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        ins = (ctypes.c_void_p * len(caps))(*[get(c, None) for c in caps])
        outs = (ctypes.c_void_p * self._n_out)()
        self._check(self._lib.AOTInductorModelContainerRun(self._handle, ins, ctypes.c_size_t(len(caps)), outs,
                                                           ctypes.c_size_t(self._n_out), None, None), "run")
        new = ctypes.pythonapi.PyCapsule_New
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [new(outs[i], None, None) for i in range(self._n_out)])

    def __call__(self, *args) -> list:
        from torch.utils._pytree import tree_leaves

        return self.boxed_run(list(tree_leaves(args)))


def load_weights(runners: list, weights_file: Path, device: str) -> dict:
    """The weights file into device memory, handed to every runner (user-managed:
    the runners share these tensors, nothing is copied)."""
    from safetensors import safe_open

    where = device if device != "cuda" else f"cuda:{torch.cuda.current_device()}"  # a tp rank: its own GPU
    with safe_open(str(weights_file), framework="pt", device=where) as f:
        consts = {k: f.get_tensor(k) for k in f.keys()}
    for r in runners:
        need = set(r.get_constant_fqns())
        missing = need - set(consts)
        if missing:
            raise BadInput(f"{weights_file}: no tensors for {sorted(missing)[:4]}... (the package needs them)")
        r.load_constants({k: consts[k] for k in need}, check_full_update=True, user_managed=True)
    return consts


def load_engine(engine_dir: str | Path, cuda_graphs: bool | None = None, elsewhere=None):
    """A built engine, as its sidecar says: an aoti LLM (decoder-only or
    encoder-decoder) or visual package, an ONNX visual encoder; an engine of
    another format (a TensorRT plan, a TensorRT-LLM engine) through
    `elsewhere(engine_dir, sidecar)`, which `enginefarm.backends.load_engine`
    passes (its backend runs it; this layer does not import the backends).
    cuda_graphs (aoti, on CUDA): capture decode steps / visual batches as
    CUDA graphs (default: as the recipe built it)."""
    engine_dir = Path(engine_dir)
    meta = sc.read(engine_dir)
    if meta.format == "aoti-pt2" and meta.tp > 1:
        if meta.tp_rank is None:  # the engine: its ranks in tp processes (runtime/tp.py)
            from .tp import TPEngine

            check_runs_here(engine_dir, meta)
            return TPEngine(engine_dir, meta)
        check_rank(engine_dir, meta)
    if meta.format == "aoti-pt2" and meta.kind == "encoder-decoder":
        from .encdec import EncDecEngine

        check_runs_here(engine_dir, meta)
        return EncDecEngine.load(engine_dir, meta)
    if meta.component == "visual" and meta.format in ("aoti-pt2", "onnx"):
        from .visual import VisualEngine

        return VisualEngine.load(engine_dir, meta, cuda_graphs)
    if meta.format == "aoti-pt2":
        return LLMEngine.load(engine_dir, cuda_graphs, meta)
    if elsewhere is None:
        raise BadInput(f"{engine_dir} holds a {meta.format} engine: its backend loads it "
                       f"(enginefarm.backends.load_engine)")
    return elsewhere(engine_dir, meta)


class EngineBase:
    """What every LLM engine shares (the decoder-only engine, the
    encoder-decoder pair): the limits it was built for, read from its
    sidecar (`meta`), its own KV caches per batch size (`cache_dims`:
    layers, kv heads, max_seq_len, head size), and the checks of a request
    against them and against its prompt table (`table`)."""

    meta: sc.Sidecar
    table: sc.PromptTable | None
    cache_dims: tuple
    dtype: torch.dtype
    device: str

    max_batch_size = property(lambda self: self.meta.max_batch_size)
    max_input_len = property(lambda self: self.meta.max_input_len)
    max_seq_len = property(lambda self: self.meta.max_seq_len)
    vocab_size = property(lambda self: self.meta.vocab_size)
    # beams per request the caches were sized for
    max_beam_width = property(lambda self: self.meta.max_beam_width)

    @staticmethod
    def reorder(t: torch.Tensor, rows: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Rows of a per-sequence tensor (the caches: batch is dim 1) in a new
        order, or repeated (beam search); unchanged when rows are 0..n-1."""
        if rows.shape[0] == t.shape[dim] and bool((rows == torch.arange(rows.shape[0])).all()):
            return t
        return t.index_select(dim, rows.to(t.device))

    @property
    def max_multimodal_len(self) -> int:
        return self.table.max_rows if self.table else 0

    def new_cache(self, batch: int):
        L, KV, S, D = self.cache_dims
        z = torch.zeros((L, batch, KV, S, D), dtype=self.dtype, device=self.device)
        return z, z.clone()

    def cache(self, batch: int):
        """The engine's own caches for a batch size, reused between calls (the step
        masks positions past the current one, and overwrites them)."""
        caches = self.__dict__.setdefault("_caches", {})
        if batch not in caches:
            caches[batch] = self.new_cache(batch)
        return caches[batch]

    @classmethod
    def _prompts_by_length(cls, prompts: list[list[int]]) -> dict[int, list[int]]:
        """_by_length for a decoder-only LLM, whose prompts need a token each."""
        if any(not p for p in prompts):
            raise BadInput("an empty prompt (no tokens)")
        return cls._by_length(prompts)

    @staticmethod
    def _by_length(seqs: list[list[int]]) -> dict[int, list[int]]:
        """Indices of seqs grouped by length: each group runs as one batch."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(seqs):
            groups.setdefault(len(p), []).append(i)
        return groups

    def _check_batch_and_input(self, batch: int, n_in: int) -> None:
        if batch > self.max_batch_size:
            raise BadInput(f"{batch} sequences in one call, but the engine was built for max_batch_size {self.max_batch_size}")
        if n_in > self.max_input_len:
            raise BadInput(f"a prompt of {n_in} tokens, but the engine was built for max_input_len {self.max_input_len}")

    def _check_table(self, prompts: list[list[int]], prompt_table) -> None:
        top = max((max(p) for p in prompts if p), default=-1)
        if prompt_table is None:
            if top >= self.vocab_size:
                raise BadInput(f"token id {top} is past the vocabulary ({self.vocab_size}) and no prompt table was given")
            return
        if not self.table:
            raise BadInput("this engine was built without a prompt table (not for a multimodal recipe)")
        rows, hidden = prompt_table.shape
        if rows > self.table.max_rows:
            raise BadInput(f"a prompt table of {rows} rows (visual features), but the engine was built for "
                           f"max_multimodal_len {self.table.max_rows}")
        if hidden != self.table.hidden_size:
            raise BadInput(f"prompt table rows of width {hidden}, but the LLM's hidden size is {self.table.hidden_size}")
        if top >= self.vocab_size + rows:
            raise BadInput(f"token id {top} points past the prompt table ({rows} rows after vocab_size {self.vocab_size})")


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
    """A decoder-only LLM engine: its general package (`runner`; None for a
    decode-only one), an optional decode package, optional CUDA-graph decode.
    `runner` may also be a DecoderLM itself (runtime/tp.py runs one rank of a
    tp > 1 checkpoint through this engine)."""

    NEEDS = ("dtype", "cache_shape", "max_batch_size", "max_input_len", "max_seq_len", "vocab_size")

    def __init__(self, runner, sidecar: sc.Sidecar, decode_runner=None, cuda_graphs: bool = False, weights=None):
        sidecar.need(*self.NEEDS)
        self.run = runner
        self.decode_run = decode_runner
        self.meta = sidecar
        self.device = sidecar.device
        self.dtype = DTYPES[sidecar.dtype]
        L, _, KV, S, D = sidecar.cache_shape
        self.cache_dims = (L, KV, S, D)
        self.table = sidecar.prompt_table
        self.cuda_graphs = bool(cuda_graphs) and self.device == "cuda"
        self.weights = weights  # keeps user-managed constants alive
        self.eager = isinstance(runner, torch.nn.Module)  # a model: whole caches in, (logits, caches) out
        self._caches: dict[int, tuple] = {}
        self._views: dict[int, tuple] = {}
        self._graphs: dict[int, _DecodeGraph] = {}

    @classmethod
    def load(cls, engine_dir: str | Path, cuda_graphs: bool | None = None, meta: sc.Sidecar | None = None) -> "LLMEngine":
        engine_dir = Path(engine_dir)
        meta = meta or sc.read(engine_dir)
        check_runs_here(engine_dir, meta)
        meta.need(*cls.NEEDS)
        files = meta.files or ({"general": meta.file} if meta.file else {})
        tp = meta.tp > 1 and meta.device == "cpu"
        runner = load_runner(engine_dir / files["general"], tp) if "general" in files else None
        decode_run = load_runner(engine_dir / files["decode"], tp) if "decode" in files else None
        if runner is None and decode_run is None:
            raise BadInput(f"{engine_dir}: the sidecar names no package: rebuild the engine")
        weights = None
        if "weights" in files:
            weights = load_weights([r for r in (runner, decode_run) if r is not None], engine_dir / files["weights"],
                                   meta.device)
        if cuda_graphs is None:
            cuda_graphs = (meta.options or {}).get("cuda_graphs", False)
        return cls(runner, meta, decode_run, cuda_graphs, weights)

    def _check(self, batch: int, n_in: int, n_new: int = 0) -> None:
        self._check_batch_and_input(batch, n_in)
        if n_in + n_new > self.max_seq_len:
            raise BadInput(
                f"{n_in} prompt tokens + {n_new} new tokens exceed the engine's max_seq_len {self.max_seq_len}"
            )

    def _layers(self, t: torch.Tensor) -> list:
        """A cache's per-layer tensors (views, which the package writes in place), kept for the engine's own caches."""
        v = self._views.get(id(t))
        if v is None or v[0] is not t:
            if len(self._views) > 16:  # beam search reorders into new caches every step
                self._views.clear()
            v = self._views[id(t)] = (t, list(t.unbind(0)))
        return v[1]

    def call(self, runner, ids, pos, kc, vc, prompt_table=None):
        """One call with device tensors; returns the logits (the caches are written in place)."""
        if self.eager:
            return runner(ids, pos, kc, vc, prompt_table)[0]
        flat = [ids, pos, *self._layers(kc), *self._layers(vc)]
        if prompt_table is not None:
            flat.append(prompt_table)
        loader = getattr(runner, "loader", None)
        if loader is not None:
            return loader.boxed_run(flat)[0]
        L = len(kc)
        return runner(ids, pos, flat[2:2 + L], flat[2 + L:2 + 2 * L], *flat[2 + 2 * L:])[0]

    def _table_arg(self, prompt_table):
        """The general package of a multimodal engine always takes a table; a text-only step gets a row of zeros."""
        if not self.table:
            return None
        if prompt_table is None:
            return torch.zeros(1, self.table.hidden_size, dtype=self.dtype, device=self.device)
        return prompt_table.to(self.device, self.dtype)

    def step(self, ids: torch.Tensor, start: int, kc, vc, prompt_table: torch.Tensor | None = None):
        """One step: logits [B, T, vocab]; the caches are written in place and returned."""
        ids = ids.to(self.device)
        if self.run is None and ids.shape[1] > 1:  # a decode-only engine: the prompt one token at a time
            for t in range(ids.shape[1]):
                lg, _, _ = self.step(ids[:, t:t + 1].clone(), start + t, kc, vc)  # a slice may be misaligned: the package would copy it
            return lg, kc, vc
        pos = torch.tensor([start], dtype=torch.long, device=self.device)
        if (ids.shape[1] == 1 and self.decode_run is not None and prompt_table is None) or self.run is None:
            lg = self.call(self.decode_run, ids, pos, kc, vc)
        else:
            lg = self.call(self.run, ids, pos, kc, vc, self._table_arg(prompt_table))
        return lg, kc, vc

    @torch.no_grad()
    def logits(self, ids: list[int], prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """[T, vocab] logits for one sequence (a prefill)."""
        self._check(1, len(ids))
        self._check_table([ids], prompt_table)
        kc, vc = self.new_cache(1)
        lg, _, _ = self.step(torch.tensor([ids], dtype=torch.long), 0, kc, vc, prompt_table)
        return lg[0].float().cpu()

    # ------------------------------------------------------------------ generation

    def _decode_graph(self, batch: int) -> _DecodeGraph:
        g = self._graphs.get(batch)
        if g is None:
            kc, vc = self.cache(batch)
            runner = self.decode_run or self.run
            extra = self._table_arg(None) if self.decode_run is None else None

            def run(ids, pos, k, v):
                return self.call(runner, ids, pos, k, v, extra)

            g = self._graphs[batch] = _DecodeGraph(run, batch, kc, vc, self.device)
        return g

    @torch.no_grad()
    def generate_ids(self, ids: torch.Tensor, max_new_tokens: int, prompt_table=None, events: dict | None = None):
        """Greedy continuation of a batch of equal-length prompts, all on the
        device, no host synchronisation per token (no end-of-sequence test):
        [B, T] -> [B, max_new_tokens] (what `enginefarm bench` times). With
        `events`, records marks 'start', 'first' (after the first token) and
        'end' into it: CUDA events on a GPU, time.perf_counter() on the CPU."""
        B, T = ids.shape
        self._check(B, T, max_new_tokens)
        cuda = self.device == "cuda"
        now = _event if cuda else time.perf_counter
        mark = (lambda k: events.__setitem__(k, now())) if events is not None else (lambda k: None)
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
            for i in range(max_new_tokens - 1):
                lg, _, _ = self.step(nxt, T + i, kc, vc)
                nxt = lg[:, -1].argmax(-1, keepdim=True)
                out.append(nxt)
        mark("end")
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None,
                 prompt_table: torch.Tensor | None = None, decoding: Decoding = GREEDY,
                 on_token: OnToken | None = None) -> list[list[int]]:
        """The continuation of each prompt, decoded as `decoding` says
        (greedy by default). Prompts of equal length run as one batch;
        others run one after another. Ids >= vocab_size pick rows of
        prompt_table (shared by the whole call). on_token(prompt index,
        token): each new token as it comes; True ends that prompt. Greedy
        runs without an end token, a callback or a table run on the device
        end to end (`generate_ids`: CUDA graphs where the engine has them)."""
        if not prompts:
            return []
        self._check(len(prompts), max(len(p) for p in prompts), max_new_tokens)
        self._check_table(prompts, prompt_table)
        decoding.check(self.max_beam_width)
        groups = self._prompts_by_length(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        fast = decoding.greedy and eos_token_id is None and on_token is None and prompt_table is None
        for n, idx in groups.items():
            ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
            if fast:
                toks = self.generate_ids(ids, max_new_tokens).cpu().tolist()
                for j, i in enumerate(idx):
                    out[i] = toks[j]
                continue
            kc, vc = self.new_cache(len(idx))
            lg, kc, vc = self.step(ids, 0, kc, vc, prompt_table)
            state = {"kc": kc, "vc": vc, "pos": n}

            def step(tokens: torch.Tensor, rows: torch.Tensor, state=state) -> torch.Tensor:
                kc, vc = self.reorder(state["kc"], rows), self.reorder(state["vc"], rows)
                lg, state["kc"], state["vc"] = self.step(tokens, state["pos"], kc, vc)
                state["pos"] += 1
                return lg[:, -1]

            tell = (lambda r, t, idx=idx: on_token(idx[r], t)) if on_token else None
            got = decode(lg[:, -1], step, [prompts[i] for i in idx], max_new_tokens, eos_token_id, decoding, tell)
            for j, i in enumerate(idx):
                out[i] = got[j]
        return out


def _event():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e
