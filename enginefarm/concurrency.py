"""What makes steps safe to run in threads of one process.

A flow fans its variants out as tasks in threads (ENGINEFARM_MAX_PARALLEL).
Two kinds of process-global state break when those threads overlap:

- **Tracing.** torch.export, the ONNX exporter and AOTInductor keep global
  state: the dispatch-mode slots, fx's module patcher (it patches
  `nn.Module.__call__` for every thread while it traces), `is_exporting()`,
  which Hugging Face models read to pick a code path. Two traces at once
  break each other ("Trying to pop empty mode stack", "CURRENT_PATCHER is
  None", "ProxyTorchDispatchMode slot already occupied"), and a model run in
  another thread during a trace may take the traced path.
- **Lazy imports.** transformers resolves its names on first use, and two
  threads importing overlapping module chains can see a half-initialised
  module ("cannot import name 'AutoTokenizer' from 'transformers'").

So:

- Every step that traces holds the gate exclusively (`TORCH_USE[step] ==
  "trace"`), every step that runs a torch model holds it shared ("run"):
  any number of runs at once, or one trace alone. `tasks.base.run_step`
  takes it from the step's name, so a new step only adds a line to
  `TORCH_USE`. Waiting steps say what they wait for.
- Imports happen before the fan-out: `warm()` imports the package's own
  modules, the heavy torch/ONNX modules and the transformers names the
  package uses; `warm_for_config()` imports the transformers modules of
  every model type a checkpoint's config.json names (its text and vision
  configs included). Both hold the gate exclusively (no step of another
  thread imports meanwhile) and one import lock, which `testing.tiny` takes
  too while it generates checkpoints. Lock order: the gate, then the import
  lock.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

# the torch work each step does: "trace" (exclusive), "run" (shared), absent: none
TORCH_USE: dict[str, str] = {
    "export": "trace",  # torch.export + the ONNX exporter of the visual component
    "build": "trace",  # torch.export + AOTInductor (aoti); TensorRT parses ONNX (no torch tracing, held anyway)
    "shards": "run",  # the Hugging Face reference in this process, the rank files in rank processes
    "validate": "run",  # the Hugging Face reference and the engines
    "calibrate": "run",  # calibration forward passes
    "reference": "run",  # the Hugging Face model on the validation inputs
}


class _Gate:
    """A readers-writer lock over torch work, writer-preferring, re-entrant
    per thread (a trace may run models; a run inside a run is one run). A
    thread that runs may not start a trace inside it: that would wait for
    itself, so it is refused."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._runs: dict[int, str] = {}  # thread id -> what it runs
        self._trace: Optional[tuple[int, str]] = None  # (thread id, what) of the one trace
        self._traces_waiting = 0
        self._depth = threading.local()

    def _busy_with(self) -> str:
        if self._trace is not None:
            return self._trace[1]
        return ", ".join(sorted(set(self._runs.values()))) or "nothing"

    def _wait(self, blocked: Callable[[], bool], waiting: Optional[Callable[[str], None]],
              why: Callable[[], str]) -> None:
        """Wait (holding the condition) while blocked, saying why once."""
        told = False
        while blocked():
            if waiting and not told:
                waiting(why())
                told = True
            self._cond.wait()

    @contextmanager
    def hold(self, mode: str, what: str, waiting: Optional[Callable[[str], None]] = None) -> Iterator[None]:
        if mode not in ("trace", "run"):
            raise ValueError(f"torch use {mode!r}: expected trace or run")
        me = threading.get_ident()
        held = getattr(self._depth, "mode", None)
        if held is not None:
            if held == "run" and mode == "trace":
                raise RuntimeError(f"{what}: a trace cannot start inside a model run of the same thread")
            self._depth.n += 1
            try:
                yield
            finally:
                self._depth.n -= 1
            return
        with self._cond:
            if mode == "trace":
                self._traces_waiting += 1
                try:
                    self._wait(lambda: self._trace is not None or bool(self._runs), waiting,
                               lambda: f"{what}: waiting for {self._busy_with()} (one trace at a time, alone)")
                finally:
                    self._traces_waiting -= 1
                self._trace = (me, what)
            else:
                self._wait(lambda: self._trace is not None or self._traces_waiting > 0, waiting,
                           lambda: f"{what}: waiting for {self._busy_with() if self._trace else 'a trace to start'}")
                self._runs[me] = what
        self._depth.mode, self._depth.n = mode, 1
        try:
            yield
        finally:
            self._depth.mode = None
            with self._cond:
                if mode == "trace":
                    self._trace = None
                else:
                    self._runs.pop(me, None)
                self._cond.notify_all()


GATE = _Gate()


@contextmanager
def torch_work(step: str, what: str, waiting: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Hold the gate as `step` needs it (TORCH_USE); a step that does no torch work passes straight through."""
    mode = TORCH_USE.get(step)
    if mode is None:
        yield
        return
    with GATE.hold(mode, what, waiting):
        yield


# ----------------------------------------------------------------------------- imports before the fan-out

IMPORTS = threading.RLock()

# modules that the steps import on first use, deep in torch and the exporters
_HEAVY = ("torch", "torch.export", "torch.onnx", "torch._inductor", "torch._dynamo", "torch.distributed",
          "torch.multiprocessing", "safetensors.torch", "onnx", "onnxruntime", "onnxscript", "numpy", "PIL.Image",
          "jsonschema", "yaml")
# the transformers names the package uses
_TRANSFORMERS = ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM",
                 "AutoProcessor", "AutoImageProcessor", "GenerationConfig", "PreTrainedTokenizerFast",
                 "PreTrainedModel")
_warm_done = False
_types_done: set[str] = set()


def _try_import(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - an optional module (onnxscript, a backend) that is not installed
        pass


def warm() -> None:
    """Import, in this thread, what the steps would import lazily: the
    package's own modules, the torch and ONNX machinery, and transformers'
    names. Once per process; call before fanning out."""
    global _warm_done
    if _warm_done:
        return
    with GATE.hold("trace", "imports"), IMPORTS:  # alone: no step of another thread imports meanwhile
        if _warm_done:
            return
        for name in _HEAVY:
            _try_import(name)
        import enginefarm

        for mod in pkgutil.walk_packages(enginefarm.__path__, "enginefarm."):
            if mod.name.startswith(("enginefarm.demo", "enginefarm.__main__")):
                continue  # entry points: importing them runs them
            _try_import(mod.name)
        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            with _quiet_transformers():
                for name in _TRANSFORMERS:
                    getattr(transformers, name, None)
        _warm_done = True


def warm_transformers() -> None:
    """transformers' own top-level names, imported in this thread: before
    threads that read configs (the nightly's parallel check) would race on
    its lazy module. Much cheaper than warm(); once per process."""
    with IMPORTS:
        try:
            import transformers
        except ImportError:
            return
        with _quiet_transformers():
            for name in _TRANSFORMERS:
                getattr(transformers, name, None)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own warnings while names are imported for later (e.g.
    "requires torchvision ... falling back"): said again if the name is used."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)


def model_types(config: dict) -> set[str]:
    """Every `model_type` in a config.json, nested configs (text, vision, encoder, decoder) included."""
    found: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, dict):
            t = x.get("model_type")
            if isinstance(t, str):
                found.add(t)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(config)
    return found


def warm_for_config(config: Optional[dict]) -> None:
    """Import the transformers modules (configuration, modeling, tokenizers,
    processors) of every model type the checkpoint's config names, and its
    `architectures` classes. Idempotent; safe to call from any thread."""
    warm()
    if not config:
        return
    try:
        import transformers
        from transformers.models.auto.configuration_auto import model_type_to_module_name
    except ImportError:
        return
    if not (model_types(config) - _types_done):
        return
    with GATE.hold("trace", "imports"), IMPORTS, _quiet_transformers():
        for t in sorted(model_types(config) - _types_done):
            try:
                pkg = importlib.import_module(f"transformers.models.{model_type_to_module_name(t)}")
            except Exception:  # noqa: BLE001 - a model type this transformers does not know
                _types_done.add(t)
                continue
            for name in getattr(pkg, "__all__", None) or [n for n in dir(pkg) if not n.startswith("_")]:
                try:
                    getattr(pkg, name)
                except Exception:  # noqa: BLE001 - a name whose backend (TF, flax, ...) is absent
                    pass
            _types_done.add(t)
        for arch in config.get("architectures") or []:
            try:
                getattr(transformers, arch)
            except Exception:  # noqa: BLE001
                pass
