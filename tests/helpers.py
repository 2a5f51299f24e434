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


def count_loads(monkeypatch, cls) -> list:
    """A Hugging Face class's from_pretrained, still the real loader, made to
    record each call's first argument in the returned list."""
    loads = []
    real = cls.from_pretrained.__func__

    def counted(klass, *a, **kw):
        loads.append(a[:1])
        return real(klass, *a, **kw)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(counted))
    return loads


def build_bf16_beside(b, tmp_path: Path, loads: list, ref_key: str, val1_key: str) -> dict:
    """The session build `b`'s recipe again, with a bf16 LLM variant beside its
    fp32 one (the visual component kept in float32: ONNX Runtime's CPU kernels
    take no bf16 convolutions), built into the same store. Checks that the
    build loaded no Hugging Face model (`loads`: count_loads' list) and that
    both variants' validates read the one stored reference `ref_key`; returns
    the bf16 variant's validate manifest."""
    import yaml

    from enginefarm.errors import GateFailed
    from enginefarm.flows.build import build
    from enginefarm.store import open_store

    st = open_store(str(b.store))
    data = yaml.safe_load(b.recipe.read_text())
    data["matrix"]["dtype"] = ["float32", "bfloat16"]
    data["components"]["visual"] = {**(data["components"].get("visual") or {}), "dtype": "float32"}
    data["default_variant"] = "fp32-tp1"
    p = tmp_path / f"{b.name}.yaml"
    p.write_text(yaml.safe_dump(data))
    try:
        build(recipe=str(p), store=str(b.store))
    except GateFailed:  # bf16 next to fp32 may miss the fp32 gates: a result, in its validate manifest
        pass
    assert loads == []  # neither the reference step (cached) nor validate loaded the Hugging Face model
    assert len(st.list_manifests(b.name, "reference")) == 1
    vals = [st.get_manifest(*x) for x in st.list_manifests(b.name, "validate")]
    assert len(vals) == 2 and {m["inputs"]["reference"]["key"] for m in vals} == {ref_key}
    (val2,) = [m for m in vals if m["key"] != val1_key]
    assert val2["variant"] == "bf16-tp1"
    return val2


def stored_fetch(b):
    """The session build `b`'s store and its fetch step's stored result."""
    from enginefarm.flows.gpu import stored_result
    from enginefarm.store import open_store

    st = open_store(str(b.store))
    ((_, _, fetch_key),) = st.list_manifests(b.name, "fetch")
    return st, stored_result(st, b.name, "fetch", fetch_key)


def only_manifest(store: Path, recipe: str, step: str) -> dict:
    """The one manifest a recipe's step wrote into the store."""
    from enginefarm.store import open_store

    st = open_store(str(store))
    rows = st.list_manifests(recipe, step)
    assert len(rows) == 1, rows
    return st.get_manifest(*rows[0])


def session_builds(tmp_path_factory, seed, extra=lambda family: {}):
    """family -> its tiny recipe (written from a fresh fixture of seed(family),
    with extra(family) recipe fields) built once into its own store."""
    from types import SimpleNamespace

    from enginefarm.flows.build import build
    from enginefarm.testing import write_tiny

    done: dict = {}

    def get(family: str):
        if family not in done:
            root = tmp_path_factory.mktemp(f"mm-{family}")
            src = write_tiny(family, root / "src", seed=seed(family))
            recipe = recipe_for(root, f"mm-{family}", family, src, **extra(family))
            store = root / "store"
            out = build(recipe=str(recipe), store=str(store))
            done[family] = SimpleNamespace(root=root, src=src, recipe=recipe, store=store, name=f"mm-{family}",
                                           out=out, variant=out["variants"]["fp32-tp1"])
        return done[family]

    return get


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


class Terminal:
    """A command in a pty, driven as a person types: `until(text)` reads the
    screen up to text (failing with what it shows when the command exits or
    the time runs out), `type(line)` presses the keys and Enter."""

    def __init__(self, argv: list[str]):
        import pty
        import subprocess

        self.master, slave = pty.openpty()
        self.p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""

    def until(self, text: str, timeout: float = 300) -> str:
        import select
        import time

        end = time.monotonic() + timeout
        while text not in self.seen:
            left = end - time.monotonic()
            assert left > 0, f"no {text!r} on the terminal; it shows: {self.seen[-2000:]!r}"
            if select.select([self.master], [], [], min(left, 1.0))[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the other end closed: the command exited
                    raise AssertionError(f"exited ({self.p.wait(5)}) before {text!r}; it showed: "
                                         f"{self.seen[-3000:]!r}") from None
            elif self.p.poll() is not None and text not in self.seen:
                raise AssertionError(f"exited ({self.p.returncode}) before {text!r}; it showed: {self.seen[-3000:]!r}")
        i = self.seen.index(text) + len(text)
        out, self.seen = self.seen[:i], self.seen[i:]
        return out

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)
        os.close(self.master)


def enginefarm_exe() -> str:
    """The enginefarm command of this interpreter's environment."""
    return str(Path(sys.executable).parent / "enginefarm")


def answers(screen: str) -> dict:
    """{"engine": text, "hf": text} from a chat answer's lines."""
    import re

    return dict(re.findall(r"^(engine|hf)> (.*?)   \(\d+\.\d\d s, \d+ tokens\)\r?$", screen, re.M))
