"""Backends: one module each, behind one interface (`base.Backend`).

`get_backend(name)` returns the backend object; `require(names, targets)`
reports every backend that is not usable here, with its install hint,
before a run starts. A backend that is not installed is never faked.
`load_engine(dir)` loads any built engine as its sidecar says.
"""

from __future__ import annotations

import importlib

from ..errors import NotAvailable
from .base import Backend

_MODULES = {
    "aoti": "aoti",
    "onnxruntime": "onnxruntime",
    "tensorrt": "tensorrt",
    "tensorrt-rtx": "tensorrt",
    "tensorrt-llm": "tensorrt_llm",
}


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise NotAvailable(f"unknown backend {name!r}; known: {', '.join(_MODULES)}")
    mod = importlib.import_module(f".{_MODULES[name]}", __name__)
    return mod.backend(name)


def load_engine(engine_dir, cuda_graphs=None):
    """Any built engine: the runtime's own formats (aoti, ONNX) by
    runtime.engine.load_engine, the others by the backend that built them."""
    from ..runtime.engine import load_engine as load

    return load(engine_dir, cuda_graphs, elsewhere=_through_backend)


def _through_backend(engine_dir, sidecar):
    flavour = (sidecar.model_extra or {}).get("flavour")
    name = {"tensorrt-plan": flavour or "tensorrt", "tensorrt-llm": "tensorrt-llm"}.get(sidecar.format)
    if name is None:
        raise NotAvailable(f"{engine_dir} holds a {sidecar.format} engine, which no backend here runs")
    return get_backend(name).load(engine_dir)


def require(pairs: list[tuple]) -> None:
    """pairs: (backend, component, target[, tp]). Raise one NotAvailable listing every problem."""
    problems = []
    for name, component, target, *rest in sorted(set(pairs)):
        b = get_backend(name)
        ok, why = b.usable(component, target)
        if not ok:
            problems.append(f"  {name} ({component}, target {target}): {why}")
        elif rest and rest[0] > b.max_tp:
            problems.append(
                f"  {name} ({component}, tp {rest[0]}): builds engines up to tp {b.max_tp}; convert and check "
                f"larger tp sizes with `enginefarm convert SRC --tp {rest[0]} --check`, build them with tensorrt-llm"
            )
    if problems:
        raise NotAvailable("cannot build here:\n" + "\n".join(problems))
