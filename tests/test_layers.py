"""The package's layering (pyproject.toml, [tool.importlinter]) holds: no
module imports a layer above its own, function-level imports included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_layers_contract_holds():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_contract_catches_an_upward_import(tmp_path):
    """The contract is live: the same check over a copy of the package in
    which a low layer (spec) imports a high one (flows) fails, naming it."""
    shutil.copytree(ROOT / "enginefarm", tmp_path / "enginefarm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    spec = tmp_path / "enginefarm" / "spec.py"
    spec.write_text(spec.read_text() + "\n\ndef _late():\n    from .flows import build  # noqa: F401\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "enginefarm.spec is not allowed to import enginefarm.flows" in r.stdout, r.stdout[-3000:]


# ---------------------------------------------------------------- cache keys


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """code_version over a copy of the package (its files edited by the test)."""
    import enginefarm.hashing as h

    shutil.copytree(ROOT / "enginefarm", tmp_path / "enginefarm", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(h, "_ROOT", tmp_path / "enginefarm")
    monkeypatch.setattr(h, "RECHECK_S", 0.0)
    for cache in (h._SOURCES, h._IMPORTS, h._VERSIONS):
        monkeypatch.setattr(h, [k for k, v in vars(h).items() if v is cache][0], {})
    h._module_path.cache_clear()
    h._origin.cache_clear()
    yield tmp_path / "enginefarm"
    h._module_path.cache_clear()
    h._origin.cache_clear()


def test_a_steps_code_version_follows_what_it_imports(package_copy):
    """The build step's key covers the modules its backend imports inside its
    functions (the runtime, enginefarm.quant that the exported graph calls),
    found from the source; editing one re-keys the step, editing the store
    (which shapes no output) does not."""
    import enginefarm.hashing as h

    pkg = package_copy
    build = ("enginefarm.tasks.build", "enginefarm.backends.aoti")
    closure = h.code_closure(*build)
    assert {"enginefarm.quant", "enginefarm.runtime.encdec", "enginefarm.runtime.decoder", "enginefarm.spec"} <= set(closure)
    assert not [m for m in closure if m.startswith(("enginefarm.store", "enginefarm.flows", "enginefarm.errors"))]
    before = h.code_version(*build)
    convert_before = h.code_version("enginefarm.tasks.convert", "enginefarm.families.opt")
    (pkg / "store" / "s3.py").write_text((pkg / "store" / "s3.py").read_text() + "\n# a comment\n")
    assert h.code_version(*build) == before
    (pkg / "quant.py").write_text((pkg / "quant.py").read_text() + "\n# a comment\n")
    after = h.code_version(*build)
    assert after != before
    assert h.code_version("enginefarm.tasks.convert", "enginefarm.families.opt") != convert_before
    # a family module re-keys the conversions through it only
    opt, llama, mistral = (h.code_version("enginefarm.tasks.convert", f"enginefarm.families.{f}")
                           for f in ("opt", "llama", "mistral"))
    (pkg / "families" / "llama.py").write_text((pkg / "families" / "llama.py").read_text() + "\n# edit\n")
    assert h.code_version("enginefarm.tasks.convert", "enginefarm.families.opt") == opt
    assert h.code_version("enginefarm.tasks.convert", "enginefarm.families.llama") != llama
    assert h.code_version("enginefarm.tasks.convert", "enginefarm.families.mistral") != mistral  # inherits llama's
