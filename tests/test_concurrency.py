"""Steps in threads of one process: the gate over torch work (one trace
alone, or any number of model runs), imports done before the fan-out, and
the nightly over the whole tiny catalog with variants in parallel.

The stress test is the heavy one. In `make test` it builds the recipes
whose steps race the most (exports and builds of several families at once,
and a LLaMA of two variants) with one nightly at
ENGINEFARM_MAX_PARALLEL=4 on a fresh store, then forces that nightly again.
`make soak` does the same over every tiny recipe (decoder-only,
encoder-decoder, multimodal, TensorRT-for-RTX visual engines), forced
ENGINEFARM_SOAK_ROUNDS times (default 3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from enginefarm.concurrency import GATE, TORCH_USE, model_types, torch_work, warm_for_config
from helpers import ROOT

BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- the gate


def _timeline(jobs: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """Run (name, mode, seconds) jobs, each in its own thread, all started
    together (those named late-* 0.05 s later, later-* 0.1 s later); return
    (name, 'in'/'out', t) events in order."""
    events, lock = [], threading.Lock()
    start = threading.Barrier(len(jobs))

    def job(name: str, mode: str, secs: float) -> None:
        start.wait()
        time.sleep({"late": 0.05, "later": 0.1}.get(name.split("-")[0], 0.0))
        with GATE.hold(mode, name):
            with lock:
                events.append((name, "in", time.monotonic()))
            time.sleep(secs)
            with lock:
                events.append((name, "out", time.monotonic()))

    threads = [threading.Thread(target=job, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "the gate deadlocked"
    return events


def _overlaps(events, a: str, b: str) -> bool:
    t = {(n, k): x for n, k, x in events}
    return t[(a, "in")] < t[(b, "out")] and t[(b, "in")] < t[(a, "out")]


def test_runs_share_the_gate_and_a_trace_runs_alone():
    ev = _timeline([("run1", "run", 0.3), ("run2", "run", 0.3), ("late-trace", "trace", 0.2),
                    ("later-run3", "run", 0.1)])
    assert _overlaps(ev, "run1", "run2")  # model runs together
    for other in ("run1", "run2", "later-run3"):
        assert not _overlaps(ev, "late-trace", other)  # a trace alone
    order = [n for n, k, _ in ev if k == "in"]
    # a waiting trace goes before a run that came after it (no starving exports)
    assert order.index("late-trace") < order.index("later-run3")


def test_two_traces_never_overlap():
    ev = _timeline([("t1", "trace", 0.2), ("t2", "trace", 0.2), ("t3", "trace", 0.2)])
    for a, b in (("t1", "t2"), ("t1", "t3"), ("t2", "t3")):
        assert not _overlaps(ev, a, b)


def test_the_gate_is_reentrant_and_refuses_a_trace_inside_a_run():
    with GATE.hold("trace", "outer"):
        with GATE.hold("run", "inner run"):  # a trace may run the model it traces
            with GATE.hold("trace", "inner trace"):
                pass
    with GATE.hold("run", "outer"):
        with GATE.hold("run", "inner"):
            pass
        with pytest.raises(RuntimeError, match="cannot start inside a model run"):
            with GATE.hold("trace", "export"):
                pass
    # released: a trace from another thread gets it at once
    got = []
    t = threading.Thread(target=lambda: GATE.hold("trace", "x").__enter__() or got.append(1))
    t.start()
    t.join(5)
    assert got == [1]
    GATE._trace = None  # that thread left without releasing: reset for the tests after this one
    GATE._cond.acquire()
    GATE._cond.notify_all()
    GATE._cond.release()


def test_every_step_that_traces_or_runs_a_model_is_in_the_table_and_waiting_is_said():
    assert TORCH_USE["export"] == TORCH_USE["build"] == "trace"
    assert TORCH_USE["validate"] == TORCH_USE["shards"] == "run"
    said = []
    held = threading.Event()
    done = threading.Event()

    def tracer():
        with torch_work("build", "build [a]"):
            held.set()
            done.wait(5)

    t = threading.Thread(target=tracer)
    t.start()
    held.wait(5)
    threading.Timer(0.2, done.set).start()
    with torch_work("validate", "validate [b]", waiting=said.append):
        pass
    t.join(5)
    assert said == ["validate [b]: waiting for build [a]"]
    with torch_work("publish", "publish [c]", waiting=said.append):  # no torch work: no gate
        pass


def test_a_configs_model_types_are_all_imported_before_the_fan_out():
    cfg = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
           "text_config": {"model_type": "llama"}, "vision_config": {"model_type": "clip_vision_model"}}
    assert model_types(cfg) == {"llava", "llama", "clip_vision_model"}
    warm_for_config(cfg)
    for mod in ("transformers.models.llava.modeling_llava", "transformers.models.llama.modeling_llama",
                "transformers.models.clip.modeling_clip", "transformers.models.llava.processing_llava"):
        assert mod in sys.modules, mod


# ----------------------------------------------------------------------------- the nightly, in parallel


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PREFECT_LOGGING_LEVEL="WARNING",
               ENGINEFARM_MAX_PARALLEL="4", ENGINEFARM_TASK_RUNNER="threads")
    return env


def _nightly(catalog: Path, store: Path, env: dict, *extra: str) -> dict:
    p = subprocess.run([str(BIN / "enginefarm"), "nightly", "--catalog", str(catalog), "--store", str(store),
                        "--json", *extra], capture_output=True, text=True, env=env, timeout=3000)
    try:
        out = json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"nightly printed no JSON (exit {p.returncode}): {p.stderr[-3000:]}") from None
    out["_exit"] = p.returncode
    out["_stderr"] = p.stderr
    return out


def _rows(out: dict) -> dict[str, dict]:
    return {f"{r['recipe']}:{r['variant']}": r for r in out["rows"]}


def _no_spurious_failure(out: dict) -> None:
    failed = {k: r["why"] for k, r in _rows(out).items() if r["status"] == "failed"}
    assert not failed, f"variants failed in a parallel nightly: {json.dumps(failed, indent=1)}"
    assert out["_exit"] == 0, out["_stderr"][-3000:]
    for spurious in ("pop empty mode stack", "CURRENT_PATCHER", "slot already occupied", "cannot import name"):
        assert spurious not in out["_stderr"], spurious


# the recipes whose steps race the most: visual exports (torch.export + ONNX)
# and aoti builds of decoder-only, encoder-decoder and multimodal LLMs, and a
# LLaMA of two variants (none / W8A16: a shards check, and two builds of one
# recipe), in one process at once (tp > 1 aoti engines, built in rank
# processes, have their own tests: tests/test_tp_engines.py)
RACERS = ("tiny-llava", "tiny-blip2-t5", "tiny-bart", "tiny-blip", "tiny-nougat")


def _matrix_recipe(catalog: Path, into: Path) -> None:
    """tiny-llama as tiny-llama-matrix: quant none / w8a16."""
    import yaml

    data = yaml.safe_load((catalog / "tiny-llama.yaml").read_text())
    data["name"] = "tiny-llama-matrix"
    data["matrix"].update(quant=["none", "w8a16"])
    (into / "tiny-llama-matrix.yaml").write_text(yaml.safe_dump(data))


@pytest.mark.timeout(5400)
def test_the_nightly_over_the_whole_tiny_catalog_in_parallel_has_no_spurious_failure(tmp_path):
    """CI (no ENGINEFARM_SOAK_ROUNDS): the racing recipes and the two-variant
    LLaMA, built by a nightly on a fresh store, then forced again. `make
    soak`: the whole tiny catalog, then forced ENGINEFARM_SOAK_ROUNDS times."""
    rounds = int(os.environ.get("ENGINEFARM_SOAK_ROUNDS", "0"))
    env = _env(tmp_path)
    env["ENGINEFARM_TINY_DIR"] = str(tmp_path / "tiny")
    tiny, store = ROOT / "models" / "tiny", tmp_path / "store"
    every = sorted(p.stem for p in tiny.glob("*.yaml"))
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    chosen = every if rounds else RACERS
    for name in chosen:
        shutil.copy(tiny / f"{name}.yaml", catalog / f"{name}.yaml")
    _matrix_recipe(tiny, catalog)

    first = _nightly(catalog, store, env)
    _no_spurious_failure(first)
    rows = _rows(first)
    assert {r.split(":")[0] for r in rows} == set(chosen) | {"tiny-llama-matrix"}  # every recipe, every variant
    assert {r["status"] for r in rows.values()} == {"built"}, rows
    assert {k for k in rows if k.startswith("tiny-llama-matrix:")} == {"tiny-llama-matrix:fp32-tp1",
                                                                       "tiny-llama-matrix:fp32-w8a16-tp1"}
    n = len(rows)

    for _ in range(max(rounds, 1)):  # again, forced: every step of every variant at once on a warm store
        forced = _nightly(catalog, store, env, "--force")
        _no_spurious_failure(forced)
        assert len(forced["rows"]) == n and {r["status"] for r in forced["rows"]} == {"built"}, forced["rows"]
