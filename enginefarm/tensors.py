"""Reading a Hugging Face checkpoint's tensors, memory-mapped: the one reader
that the families (visual weights), the converter and the runtime share."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import BadInput


class TensorSource:
    """All tensors of a Hugging Face checkpoint directory, memory-mapped."""

    def __init__(self, root: str | Path, allow_pickle: bool = False):
        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        single = self.root / "model.safetensors"
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise BadInput(f"corrupt checkpoint index {index}: {e}") from None
            for name, fn in wm.items():
                self._where[name] = self.root / fn
        elif single.is_file():
            for name in self._open(single).keys():
                self._where[name] = single
        else:
            bins = list(self.root.glob("*.bin"))
            if bins and not allow_pickle:
                raise BadInput(
                    f"{self.root} has only pickled .bin weights; they are refused unless the recipe sets "
                    f"source.allow_pickle: true"
                )
            raise BadInput(f"no safetensors weights in {self.root} (expected model.safetensors or its index)")

    def _open(self, path: Path):
        h = self._handles.get(path)
        if h is None:
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise BadInput(f"corrupt safetensors file {path}: {e}") from None
            self._handles[path] = h
        return h

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise BadInput(f"checkpoint {self.root} has no tensor {name!r}")
        return self._open(self._where[name]).get_tensor(name)
