"""Helpers shared by the tests: tiny recipes pointing at a checkpoint
directory, and an audit hook that records which files a piece of code opens."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def recipe_for(tmp_path: Path, name: str, family: str, src: Path, **extra) -> Path:
    """A copy of the tiny recipe of `family`, pointing at src as a local path."""
    import yaml

    data = yaml.safe_load((ROOT / "models" / "tiny" / f"tiny-{family}.yaml").read_text())
    data["name"] = name
    data["source"] = {"path": str(src)}
    for k, v in extra.items():
        data[k] = v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


class OpenSpy:
    """Records every Python-level open() of a file under the given roots."""

    def __init__(self, *roots):
        self.roots = [str(Path(r).resolve()) for r in roots]
        self.hits = []
        self.on = False

    def __call__(self, event, args):
        if self.on and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.path.realpath(os.fsdecode(args[0]))
            if any(p.startswith(r) for r in self.roots):
                self.hits.append(p)

    def watch(self, *roots) -> "OpenSpy":
        self.roots = [str(Path(r).resolve()) for r in roots]
        self.hits.clear()
        return self

    def __enter__(self) -> "OpenSpy":
        self.on = True
        return self

    def __exit__(self, *exc) -> None:
        self.on = False


# one hook for the session (audit hooks cannot be removed)
SPY = OpenSpy()
sys.addaudithook(SPY)
