"""The registry: provenance and schema, promote, pull (plain and Triton),
ls/show/diff, gc, and the faults it must survive, each one really done:
publishers SIGKILLed at random points, publishers racing, corrupted blobs,
an S3 endpoint that answers 503 or drops connections (a fault-injecting
proxy in front of the moto server), bad refs and paths. Against the local
store and the S3 test server."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from enginefarm.cli import main as cli
from enginefarm.errors import StepFailed
from enginefarm.hashing import digest_json
from enginefarm.store import open_store
from enginefarm.store.pull import MARKER
from enginefarm.tasks.base import SCHEMA, SCHEMA_FILE, validate_manifest
from enginefarm.testing.engines import child_publish, child_pull, open_store_for, publish_synthetic

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
V = "fp32-tp1"


# ---------------------------------------------------------------------- helpers


@pytest.fixture(params=["local", "s3"])
def uri(request, tmp_path):
    """A fresh store URI: a directory, or s3://<fresh bucket>/engines."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_store_uri")


@pytest.fixture(scope="session")
def procs():
    """Child processes forked from a clean server process that has the
    publishing code imported already (fast to start, safe to SIGKILL)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["enginefarm.testing.engines", "enginefarm.tasks.publish", "enginefarm.store.s3",
                                "enginefarm.store.pull", "enginefarm.registry", "boto3"])
    return ctx


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL")


def expected_files(seed: int, n_files: int, size: int) -> set[str]:
    rng = random.Random(seed)
    return {hashlib.sha256(rng.randbytes(size)).hexdigest() for _ in range(n_files)}


def engine_digests(st, alias: str = "latest", name: str = "synth") -> set[str]:
    value, _ = st.get_ref(name, V, alias)
    m = st.get_manifest_by_path(value["manifest"])
    return {f["sha256"] for rel, f in m["files"].items() if rel != "llm/engine.json"}


def assert_consistent(st, checked: set | None = None) -> None:
    """No manifest names a missing blob or input; every alias points at an
    existing manifest (by digest); every blob hashes to its name (those not
    in `checked` already: blobs never change)."""
    blobs = set(st.list_blobs())
    for r, s, k in st.list_manifests():
        m = st.get_manifest(r, s, k)
        for rel, f in m["files"].items():
            assert f["sha256"] in blobs, f"manifests/{r}/{s}/{k} names {rel}, whose blob is missing"
        for name, inp in m["inputs"].items():
            assert st.get_manifest(r, inp["step"], inp["key"]) is not None, f"{r}/{s}/{k}: input {name} is missing"
    for r, v, a in st.list_refs():
        value, _ = st.get_ref(r, v, a)
        m = st.get_manifest_by_path(value["manifest"])
        assert m is not None, f"alias {r}:{v}@{a} points at a missing manifest"
        assert digest_json(m) == value["digest"]
    checked = set() if checked is None else checked
    for b in blobs - checked:
        st.read_blob(b)  # CorruptBlob if a partial or wrong object was left
        checked.add(b)


def store_keys(st) -> list[str]:
    return sorted(k for prefix in ("blobs/", "manifests/", "refs/", "locks/") for k in st._list(prefix))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = cli([str(a) for a in args])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------- a real engine, built once


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """tiny-opt built for real (aoti) into a local store, once per session."""
    import yaml

    from enginefarm.flows.build import build
    from enginefarm.testing import write_tiny

    tmp = tmp_path_factory.mktemp("registry-build")
    src = write_tiny("opt", tmp / "src", seed=7)
    data = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-opt.yaml").read_text())
    data.update(name="reg-opt", source={"path": str(src)})
    recipe = tmp / "reg-opt.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = build(recipe=str(recipe), store=str(tmp / "store"))
    return {"store": str(tmp / "store"), "summary": out["variants"][V], "src": src, "recipe": recipe}


def test_every_manifest_follows_the_versioned_schema_with_full_provenance(built):
    st = open_store(built["store"])
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["properties"]["schema"]["const"] == SCHEMA == "enginefarm.manifest/2"
    steps = set()
    for r, s, k in st.list_manifests():
        m = st.get_manifest(r, s, k)
        validate_manifest(m)
        steps.add(s)
    assert steps == {"fetch", "reference", "convert", "build", "validate", "publish"}

    value, _ = st.get_ref("reg-opt", V, "validated")
    m = st.get_manifest_by_path(value["manifest"])
    p = m["results"]
    fetch = st.get_manifest("reg-opt", "fetch", m["inputs"]["fetch"]["key"])
    assert p["recipe"]["name"] == "reg-opt" and p["recipe"]["digest"] == m["recipe_digest"]
    assert p["source"]["kind"] == "path" and p["source"]["repo"] == str(built["src"])
    assert p["source_files"] == {rel: f["sha256"] for rel, f in fetch["files"].items()}
    assert p["source_files"]["model.safetensors"] == hashlib.sha256(
        (built["src"] / "model.safetensors").read_bytes()).hexdigest()
    assert p["variant"] | {} == {"name": V, "backend": "aoti", "dtype": "float32", "quant": "none", "tp": 1,
                                 "target": "cpu", "group_size": None, "components": ["llm"]}
    import torch
    import transformers

    assert p["toolchain"]["torch"] == torch.__version__ and p["toolchain"]["transformers"] == transformers.__version__
    assert set(p["toolchain"]) >= {"python", "tensorrt_flavour", "tensorrt", "tensorrt_llm", "cuda"}
    assert p["components"]["llm"]["toolchain"]["torch"] == torch.__version__
    assert set(p["timings"]) == {"fetch", "convert", "build.llm", "validate"}
    assert p["timings"]["build.llm"] > 0 and p["build_host"]["host"]
    assert p["validation"]["passed"] is True and p["validation"]["metrics"]["perplexity"]["engine"] > 1
    for name, inp in m["inputs"].items():  # every input by digest
        assert digest_json(st.get_manifest("reg-opt", inp["step"], inp["key"])) == inp["digest"]
    for rel, f in m["files"].items():
        assert st.has_blob(f["sha256"]) and len(st.read_blob(f["sha256"])) == f["size"]

    # the schema refuses what it should: an unsafe file path, a publish without provenance
    bad = json.loads(json.dumps(m))
    bad["files"]["../evil"] = bad["files"].pop("llm/llm.pt2")
    with pytest.raises(StepFailed, match="files"):
        validate_manifest(bad)
    bad = json.loads(json.dumps(m))
    del bad["results"]["toolchain"]
    with pytest.raises(StepFailed, match="toolchain"):
        validate_manifest(bad)


def test_pull_triton_layout_is_a_model_repository_that_serves(built, tmp_path, capsys):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    store = built["store"]
    dest = tmp_path / "repo"
    rc, out, err = run_cli(capsys, "pull", "reg-opt", "--variant", V, "--alias", "validated", "--dest", dest,
                           "--layout", "triton", "--store", store, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["ok"] and res["validation"] and res["layout"] == "triton"
    # structure: one model per component, config.pbtxt beside version folder 1
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "llm"]
    cfg = text_format.Parse((dest / "llm" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "llm" and cfg.backend == "python" and cfg.max_batch_size == 2
    assert [i.name for i in cfg.input] == ["input_ids", "max_new_tokens"]
    assert cfg.input[0].data_type == model_config_pb2.TYPE_INT64 and list(cfg.input[0].dims) == [-1]
    assert [o.name for o in cfg.output] == ["output_ids"]
    assert [d.name for d in (dest / "llm").iterdir() if d.is_dir()] == ["1"]
    version = dest / "llm" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["engine.json", "llm.pt2", "model.py"]
    manifest = json.loads(run_cli(capsys, "show", "reg-opt@validated", "--store", store, "--json")[1])["manifest"]
    for rel, f in manifest["files"].items():
        assert hashlib.sha256((version / rel.split("/", 1)[1]).read_bytes()).hexdigest() == f["sha256"]

    # model.py, run the way Triton's Python backend runs it (its utils module
    # stood in by the documented names), serves the engine
    (tmp_path / "triton_python_backend_utils.py").write_text(
        "class Tensor:\n"
        "    def __init__(self, name, array): self._name, self._array = name, array\n"
        "    def as_numpy(self): return self._array\n"
        "    def name(self): return self._name\n"
        "class TritonError(Exception):\n    pass\n"
        "class InferenceResponse:\n"
        "    def __init__(self, output_tensors, error=None): self.output_tensors, self.error = output_tensors, error\n"
        "def get_input_tensor_by_name(request, name): return request.get(name)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import numpy as np

        spec = importlib.util.spec_from_file_location("triton_model", version / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.TritonPythonModel()
        model.initialize({"model_repository": str(dest / "llm"), "model_version": "1",
                          "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True))})
        pb = sys.modules["triton_python_backend_utils"]
        prompts = np.array([[5, 9, 11], [7, 3, 2]], dtype=np.int64)
        req = {"input_ids": pb.Tensor("input_ids", prompts),
               "max_new_tokens": pb.Tensor("max_new_tokens", np.array([[4], [4]], dtype=np.int32))}
        (resp,) = model.execute([req])
        assert resp.error is None
        got = resp.output_tensors[0].as_numpy()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("triton_python_backend_utils", None)
    from enginefarm.runtime.engine import LLMEngine

    want = LLMEngine.load(version).generate(prompts.tolist(), 4)
    assert got.tolist() == want and got.shape == (2, 4)


# ---------------------------------------------------------------------- pull


def test_pull_verifies_moves_atomically_replaces_and_is_up_to_date(uri, tmp_path, capsys):
    st = open_store(uri)
    first = publish_synthetic(st, seed=1, n_files=6, size=48 * 1024)
    dest = tmp_path / "ci" / "engines"
    rc, out, err = run_cli(capsys, "pull", f"synth:{V}@latest", "--dest", dest, "--store", uri, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["digest"] == first.digest and res["fetched_bytes"] == res["bytes"] > 6 * 48 * 1024
    for f in res["files"]:
        assert hashlib.sha256((dest / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["engines"]  # no staging left beside it
    # again: nothing fetched
    rc, out, _ = run_cli(capsys, "pull", "synth", "--dest", dest, "--store", uri, "--json")
    assert rc == 0 and json.loads(out)["up_to_date"] and json.loads(out)["fetched_bytes"] == 0
    # a new engine replaces the earlier pull in one step
    second = publish_synthetic(st, seed=2, n_files=3, size=32 * 1024)
    rc, out, _ = run_cli(capsys, "pull", "synth", "--dest", dest, "--store", uri, "--json")
    assert rc == 0 and json.loads(out)["digest"] == second.digest
    assert sorted(p.name for p in (dest / "llm").iterdir()) == ["engine.json", "rank0.engine", "rank1.engine",
                                                                 "rank2.engine"]
    assert json.loads((dest / MARKER).read_text())["digest"] == second.digest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["engines"]
    # a file that no pull wrote is never thrown away with the earlier pull
    (dest / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "pull", "synth@validated", "--dest", dest, "--store", uri)
    assert rc == 0  # the same engine: up to date, nothing replaced
    publish_synthetic(st, seed=12, n_files=1, size=1024)
    rc, _, err = run_cli(capsys, "pull", "synth", "--dest", dest, "--store", uri)
    assert rc == 2 and "notes.txt" in err and (dest / "notes.txt").read_text() == "mine"
    assert json.loads((dest / MARKER).read_text())["digest"] == second.digest


def test_interrupted_pull_leaves_nothing_at_dest_and_resumes(procs, s3_store_uri, tmp_path, capsys):
    st = open_store(s3_store_uri)
    publish_synthetic(st, seed=3, n_files=12, size=128 * 1024)
    dest = tmp_path / "engines"
    p = procs.Process(target=child_pull, args=(s3_store_uri, endpoint(), "synth", str(dest), 1))
    p.start()
    deadline = time.monotonic() + 60
    staged = []
    while time.monotonic() < deadline and p.is_alive():
        staged = [x for x in tmp_path.glob(".engines.pull-*/llm/rank*.engine")]
        if len(staged) >= 2:
            break
        time.sleep(0.01)
    assert p.is_alive(), "the pull finished before it could be interrupted"
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert not dest.exists()  # nothing half-written at DEST
    rc, out, err = run_cli(capsys, "pull", "synth", "--dest", dest, "--store", s3_store_uri, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["reused_files"] >= 2 and res["fetched_bytes"] < res["bytes"]
    for f in res["files"]:
        assert hashlib.sha256((dest / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["engines"]


def test_corrupt_blob_on_pull_names_the_file_and_writes_nothing(uri, tmp_path, capsys):
    st = open_store(uri)
    good = publish_synthetic(st, seed=4, n_files=5, size=16 * 1024)
    dest = tmp_path / "engines"
    assert run_cli(capsys, "pull", "synth", "--dest", dest, "--store", uri)[0] == 0
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    bad = publish_synthetic(st, seed=5, n_files=5, size=16 * 1024)
    victim = bad.files["llm/rank3.engine"]["sha256"]
    st._put_bytes(st.blob_key(victim), b"flipped bits" * 100)  # corrupt it behind the store's back
    rc, out, err = run_cli(capsys, "pull", "synth", "--dest", dest, "--store", uri)
    assert rc == 1 and "llm/rank3.engine" in err and "corrupt" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before  # the earlier pull, untouched
    fresh = tmp_path / "fresh"
    rc, out, err = run_cli(capsys, "pull", "synth", "--dest", fresh, "--store", uri, "--json")
    assert rc == 1 and not fresh.exists()
    res = json.loads(out)
    assert res["ok"] is False and "llm/rank3.engine" in res["error"] and res["exit_code"] == 1
    assert good.digest != bad.digest


# ---------------------------------------------------------------------- promote, ls, show, diff


def test_promote_refuses_unvalidated_and_keeps_alias_history(uri, capsys):
    st = open_store(uri)
    ok = publish_synthetic(st, seed=6, passed=True)
    rc, _, err = run_cli(capsys, "promote", "synth@validated", "prod", "--store", uri)
    assert rc == 0, err
    failed = publish_synthetic(st, seed=7, passed=False, ppl=12.5)
    assert st.get_ref("synth", V, "latest")[0]["digest"] == failed.digest
    assert st.get_ref("synth", V, "validated")[0]["digest"] == ok.digest  # not moved by a failed build

    rc, _, err = run_cli(capsys, "promote", "synth", "prod", "--store", uri)
    assert rc == 1 and "refusing" in err and "--force" in err
    assert st.get_ref("synth", V, "prod")[0]["digest"] == ok.digest
    for alias in ("validated", "latest"):  # never, forced or not
        rc, _, err = run_cli(capsys, "promote", "synth", alias, "--force", "--store", uri)
        assert rc == 2 and alias in err
    assert st.get_ref("synth", V, "validated")[0]["digest"] == ok.digest

    rc, out, err = run_cli(capsys, "promote", "synth@latest", "prod", "--force", "--store", uri, "--json")
    assert rc == 0 and json.loads(out)["forced"] is True
    rc, out, _ = run_cli(capsys, "promote", "synth@validated", "prod", "--store", uri)  # roll back
    assert rc == 0
    hist = st.ref_history("synth", V, "prod")
    moves = [(h["value"]["previous"], h["value"]["digest"], h["value"].get("forced")) for h in hist]
    assert moves == [(None, ok.digest, False), (ok.digest, failed.digest, True), (failed.digest, ok.digest, False)]
    for h in hist:
        assert h["at"] and "@" in h["value"]["moved_by"] and h["value"]["reason"].startswith("promoted from @")

    # show: the history; diff: what changed between the two builds
    rc, out, _ = run_cli(capsys, "show", "synth@prod", "--store", uri, "--json")
    assert rc == 0 and len(json.loads(out)["history"]) == 3
    rc, out, _ = run_cli(capsys, "diff", "synth@validated", "synth@latest", "--store", uri, "--json")
    changes = json.loads(out)["changes"]
    assert changes["metrics"]["passed"] == [True, False]
    assert changes["metrics"]["metrics.perplexity.engine"] == [10.0, 12.5]
    assert "steps.build.llm" in changes["inputs"] and not changes["toolchain"] and not changes["variant"]
    assert any(k.startswith("llm/rank0.engine") for k in changes["files"])
    rc, out, _ = run_cli(capsys, "diff", "synth@validated", "synth@latest", "--store", uri)
    assert rc == 0 and "metrics: 4 change(s)" in out and "passed: true -> false" in out

    rc, out, _ = run_cli(capsys, "ls", "synth", "--store", uri)
    lines = out.splitlines()
    assert "ALIASES" in lines[0] and "VALIDATION" in lines[0] and "AGE" in lines[0]
    row = next(x for x in lines if "prod" in x)
    assert "validated" in row and "passed" in row and ok.digest[:12] in row
    row = next(x for x in lines if "latest" in x)
    assert "failed" in row and failed.digest[:12] in row and "MB" in row


# ---------------------------------------------------------------------- bad input


BAD_REFS = ["../x", "x/../y", "/abs", "/etc/passwd", "a b", "A", "x;rm", "x@../y", "x:../v", "x@a/b", "x:v@", "", "x\n"]


@pytest.mark.parametrize("bad", BAD_REFS)
def test_bad_refs_are_refused_with_exit_2_and_nothing_changes(tmp_path, capsys, bad):
    uri = str(tmp_path / "store")
    st = open_store(uri)
    publish_synthetic(st, seed=8, n_files=1, size=10)
    before = store_keys(st)
    for args in (["show", bad], ["pull", bad, "--dest", tmp_path / "d"], ["promote", bad, "prod"],
                 ["promote", "synth", bad], ["diff", bad, "synth"], ["pull", "synth", "--variant", bad, "--dest",
                                                                    tmp_path / "d"],
                 ["pull", "synth", "--alias", bad, "--dest", tmp_path / "d"]):
        rc, out, err = run_cli(capsys, *args, "--store", uri)
        assert rc == 2, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if bad:
        rc, _, err = run_cli(capsys, "ls", bad, "--store", uri)
        assert rc == 2 and "Traceback" not in err
    assert store_keys(st) == before and not (tmp_path / "d").exists()


def test_bad_options_and_unsafe_manifest_paths_are_refused(tmp_path, capsys):
    uri = str(tmp_path / "store")
    st = open_store(uri)
    pub = publish_synthetic(st, seed=9, n_files=1, size=10)
    d = tmp_path / "d"
    for args, msg in ((["pull", "synth", "--dest", d, "--gpu", "sm9"], "--gpu"),
                      (["pull", "synth", "--dest", d, "--gpu", "sm_90"], "built for sm_90"),
                      (["pull", f"synth:{V}", "--variant", "other", "--dest", d], "--variant"),
                      (["pull", "synth@latest", "--alias", "prod", "--dest", d], "--alias"),
                      (["pull", "synth", "--dest", d, "--layout", "zip"], "layout"),
                      (["pull", "synth", "--dest", tmp_path / "store"], "not empty"),
                      (["gc", "--keep", "-1"], "--keep"),
                      (["show", "nosuch"], "no engines")):
        rc, _, err = run_cli(capsys, *args, "--store", uri)
        assert rc == 2 and msg in err and "Traceback" not in err, (args, err)
        assert len([x for x in err.splitlines() if x.startswith("enginefarm")]) == 1, err
    assert not d.exists()
    # a manifest (written behind the store's back) that names a path outside DEST
    m = st.get_manifest("synth", "publish", pub.key)
    for evil in ("../evil", "/tmp/evil", "llm/../../evil", "llm/.hidden", "llm/a\\b"):
        m2 = json.loads(json.dumps(m))
        m2["files"][evil] = m2["files"]["llm/rank0.engine"]
        key = hashlib.sha256(evil.encode()).hexdigest()
        st.put_manifest("synth", "publish", key, m2)
        st.move_alias("synth", V, "evil", st.manifest_path("synth", "publish", key), digest_json(m2), "test")
        rc, _, err = run_cli(capsys, "pull", "synth@evil", "--dest", d, "--store", uri)
        assert rc == 2 and "bad file path" in err, err
        assert not d.exists() and not (tmp_path / "evil").exists()


# ---------------------------------------------------------------------- faults and concurrency


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_publish_killed_at_random_points_leaves_no_dangling_reference(kind, procs, tmp_path, request):
    uri = str(tmp_path / "store") if kind == "local" else request.getfixturevalue("s3_store_uri")
    # S3: files of 6 MiB in 5 MiB parts, so kills land inside multipart uploads too
    n, size, part = (2, 6 * MiB, 5) if kind == "s3" else (12, 1 * MiB, None)
    kw = {"n_files": n, "size": size}
    st = open_store(uri)

    def start(seed):
        p = procs.Process(target=child_publish, args=(uri, endpoint(), "synth", seed, kw, None, None, part))
        p.start()
        return p

    t0 = time.monotonic()
    p = start(100)
    p.join(120)
    assert p.exitcode == 0
    full = time.monotonic() - t0  # how long one publish takes, start to end
    checked: set = set()
    interrupted = attempts = 0
    while interrupted < 3 and attempts < 10:
        attempts += 1
        t0 = time.monotonic()
        p = start(attempts)
        p.join(random.uniform(0.1, 0.9) * full)  # a random point of the publish
        if p.is_alive():  # (not reaped while alive: the kill cannot hit another process)
            os.kill(p.pid, signal.SIGKILL)
            interrupted += 1
        else:  # it was quicker than that: aim earlier next time
            full = min(full, time.monotonic() - t0)
        p.join()
        assert_consistent(st, checked)
        p = start(attempts)  # the rerun completes
        p.join(120)
        assert p.exitcode == 0
        assert_consistent(st, checked)
        assert engine_digests(st) == expected_files(attempts, n, size)
    assert interrupted == 3, f"only {interrupted} of {attempts} publishes were killed before they finished"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_publishers_end_with_consistent_aliases(kind, procs, tmp_path, request):
    uri = str(tmp_path / "store") if kind == "local" else request.getfixturevalue("s3_store_uri")
    st = open_store(uri)
    go, q = procs.Event(), procs.Queue()
    kw = {"n_files": 6, "size": 256 * 1024}
    ps = [procs.Process(target=child_publish, args=(uri, endpoint(), "synth", seed, kw, go, q)) for seed in (21, 22, 23)]
    for p in ps:
        p.start()
    time.sleep(0.3)
    go.set()
    results = {q.get(timeout=120)[2] for _ in ps}
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    assert len(results) == 3
    assert_consistent(st)
    for alias in ("latest", "validated"):
        value, _ = st.get_ref("synth", V, alias)
        assert value["digest"] in results
        hist = st.ref_history("synth", V, alias)
        assert {h["value"]["digest"] for h in hist} == results  # every move recorded, none lost
        assert hist[-1]["value"]["digest"] == value["digest"]
        # each move started from what the alias held before it (compare-and-swap, no lost update)
        assert [h["value"]["previous"] for h in hist] == [None] + [h["value"]["digest"] for h in hist[:-1]]
    assert len(st.list_manifests("synth", "publish")) == 3


def test_gc_keeps_aliases_and_the_newest_and_deletes_the_rest(uri, tmp_path, capsys):
    st = open_store(uri)
    pubs = [publish_synthetic(st, seed=30 + i, n_files=2, size=8 * 1024, passed=(i != 3)) for i in range(5)]
    assert run_cli(capsys, "promote", "synth@validated", "prod", "--store", uri)[0] == 0  # seed 34
    first = pubs[0]
    path = st.manifest_path("synth", "publish", first.key)
    st.move_alias("synth", V, "canary", path, first.digest, "test")
    keys_before = store_keys(st)
    rc, out, _ = run_cli(capsys, "gc", "--keep", "2", "--dry-run", "--store", uri, "--json")
    assert rc == 0 and json.loads(out)["manifests"]["deleted"] == 10  # 2 engines x (5 manifests)
    assert store_keys(st) == keys_before
    rc, out, err = run_cli(capsys, "gc", "--keep", "2", "--store", uri, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["manifests"]["deleted"] == 10 and res["blobs"]["deleted"] > 0 and res["bytes_freed"] > 0
    kept = {k for _, _, k in st.list_manifests("synth", "publish")}
    assert kept == {pubs[0].key, pubs[3].key, pubs[4].key}  # canary, and the two newest
    assert_consistent(st)
    for alias in ("latest", "validated", "prod", "canary"):
        assert run_cli(capsys, "pull", f"synth@{alias}", "--dest", tmp_path / alias, "--store", uri)[0] == 0
    rc, out, _ = run_cli(capsys, "gc", "--keep", "2", "--store", uri, "--json")
    assert json.loads(out)["manifests"]["deleted"] == 0 and json.loads(out)["blobs"]["deleted"] == 0


def test_gc_with_a_stale_or_lost_index_never_deletes_live_data(s3_store_uri, tmp_path, capsys):
    """gc reads manifests and refs through the store index (store/index.py).
    On real S3 (moto's server, over HTTP): an index written before `latest`
    was rolled back to the oldest engine, behind its back (stale), one that
    is gone, and one that is unreadable, each give the answer of no index:
    the rolled-back engine and its blobs are live, the engine nothing names
    and the blob of a crashed publish are garbage, found and deleted."""
    from enginefarm.store.index import INDEX_KEY

    uri = s3_store_uri
    st = open_store(uri)
    pubs = [publish_synthetic(st, seed=60 + i, n_files=2, size=8 * 1024) for i in range(3)]
    rc, out, err = run_cli(capsys, "gc", "--keep", "3", "--store", uri, "--json")  # nothing to delete; writes the index
    assert rc == 0 and json.loads(out)["manifests"]["deleted"] == 0, err
    assert st._get_bytes(INDEX_KEY), "gc wrote no index: the stale case below would test nothing"

    old, mid, new = pubs
    st.move_alias("synth", V, "latest", st.manifest_path("synth", "publish", old.key), old.digest, "rollback")
    orphan = st.put_blob_bytes(b"the one blob a crashed publish got to write")

    def files(p) -> set[str]:
        return {f["sha256"] for f in st.get_manifest("synth", "publish", p.key)["files"].values()}

    live = files(old) | files(new)  # latest -> old, validated -> new
    garbage = (files(mid) - live) | {orphan}
    assert live and files(mid) - live, "the engines share every blob: nothing to tell apart"
    mid_path = st.manifest_path("synth", "publish", mid.key)
    answers = {}
    for state in ("stale", "lost", "unreadable"):
        if state == "lost":
            st._delete(INDEX_KEY)
        elif state == "unreadable":
            st._put_bytes(INDEX_KEY, b"not an index")
        rc, out, err = run_cli(capsys, "gc", "--keep", "0", "--dry-run", "--store", uri, "--json")
        assert rc == 0, err
        res = json.loads(out)
        res.pop("store")
        answers[state] = res
        assert st.manifest_path("synth", "publish", old.key) not in res["deleted_manifests"], state
        assert mid_path in res["deleted_manifests"], state
        assert res["blobs"]["deleted"] >= len(garbage), (state, res["blobs"])
        assert "synth:fp32-tp1@latest" in res["aliases"], state
    assert answers["stale"] == answers["lost"] == answers["unreadable"]

    rc, out, err = run_cli(capsys, "gc", "--keep", "3", "--store", uri, "--json")  # for real: a fresh index
    assert rc == 0 and json.loads(out)["blobs"]["deleted"] == 1, err  # the orphan (keep 3 keeps every engine)
    assert not st.has_blob(orphan) and st._get_bytes(INDEX_KEY) != b"not an index"
    # behind the fresh index's back: latest -> mid, and a second crashed publish
    st.move_alias("synth", V, "latest", mid_path, mid.digest, "stale now")
    orphan = st.put_blob_bytes(b"another crashed publish")
    live, old_files = files(mid) | files(new), files(old)
    before = set(st.list_blobs())
    rc, out, err = run_cli(capsys, "gc", "--keep", "0", "--store", uri, "--json")  # for real, the index stale
    assert rc == 0, err
    gone = before - set(st.list_blobs())
    assert not gone & live, "gc deleted a blob that an alias reaches"
    assert orphan in gone and old_files - live <= gone, gone
    assert json.loads(out)["blobs"]["deleted"] == len(gone)
    assert st.get_manifest("synth", "publish", old.key) is None and st.get_manifest("synth", "publish", mid.key)
    assert_consistent(st)
    assert run_cli(capsys, "pull", "synth@latest", "--dest", tmp_path / "latest", "--store", uri)[0] == 0


def test_gc_waits_for_a_running_publish_and_never_breaks_it(procs, s3_store_uri, capsys):
    uri = s3_store_uri
    st = open_store(uri)
    old = publish_synthetic(st, seed=40, n_files=2, size=8 * 1024)
    publish_synthetic(st, seed=41, n_files=2, size=8 * 1024)
    kw = {"n_files": 3, "size": 6 * MiB}
    p = procs.Process(target=child_publish, args=(uri, endpoint(), "synth", 42, kw, None, None, 5))
    p.start()
    deadline = time.monotonic() + 30
    while not st.list_locks() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert st.list_locks(), "the publisher never took the store lock"
    keys = set(store_keys(st))
    rc, _, err = run_cli(capsys, "gc", "--keep", "1", "--wait", "0", "--store", uri)
    assert rc == 1 and "busy" in err and "synthetic publish synth" in err
    assert keys <= set(store_keys(st))  # nothing deleted
    assert p.is_alive(), "the publish ended before gc ran next to it"
    rc, out, err = run_cli(capsys, "gc", "--keep", "1", "--wait", "60", "--store", uri, "--json")
    assert rc == 0, err
    p.join(60)
    assert p.exitcode == 0
    assert_consistent(st)
    assert engine_digests(st) == expected_files(42, 3, 6 * MiB)
    assert st.get_manifest("synth", "publish", old.key) is None  # collected once the publish was done

    # a publisher SIGKILLed while holding the lock does not block gc (its process is gone)
    p = procs.Process(target=child_publish, args=(uri, endpoint(), "synth", 43, kw, None, None, 5))
    p.start()
    while not st.list_locks() and p.is_alive():
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    rc, out, err = run_cli(capsys, "gc", "--keep", "1", "--wait", "0", "--store", uri, "--json")
    assert rc == 0, err
    assert json.loads(out)["stale_locks"] >= 1 and not st.list_locks()
    assert_consistent(st)


def test_s3_throttling_and_dropped_connections_are_survived(s3_server, s3_store_uri, tmp_path, monkeypatch, capsys):
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_server)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        st = open_store_for(s3_store_uri, part_mb=5)
        proxy.outage(1.0, "503")  # down for a while: every request answered 503 SlowDown
        proxy.fail_requests({n: ("drop" if i % 2 else "503") for i, n in enumerate(range(3, 40, 4))})
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(11 * MiB))  # 3 parts
        pub = publish_synthetic(st, seed=50, n_files=3, size=64 * 1024, files={"big.bin": big})
        proxy.outage(0.8, "drop")
        rc, out, err = run_cli(capsys, "pull", "synth", "--dest", tmp_path / "pulled", "--store", s3_store_uri,
                               "--json")
        assert rc == 0, err
        assert (tmp_path / "pulled" / "llm" / "big.bin").read_bytes() == big.read_bytes()
        assert json.loads(out)["digest"] == pub.digest
        assert proxy.faults["503"] >= 5 and proxy.faults["drop"] >= 5, proxy.faults
        assert_consistent(st)
    finally:
        proxy.close()


def test_republish_sends_zero_blob_bytes_and_checksums_are_sent(s3_store_uri, tmp_path):
    st = open_store_for(s3_store_uri, part_mb=5)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * MiB))
    sent: dict[str, int] = {}
    checksums = []

    def count(params, model, **kw):
        key = params.get("Key", "")
        body = params.get("Body")
        n = len(body) if isinstance(body, (bytes, bytearray)) else getattr(body, "_size", None) or 0
        if hasattr(body, "seek") and not isinstance(body, (bytes, bytearray)):
            pos = body.tell()
            body.seek(0, 2)
            n = body.tell() - pos
            body.seek(pos)
        kind = "blob" if "/blobs/" in key else "other"
        sent[kind] = sent.get(kind, 0) + n
        if model.name in ("PutObject", "UploadPart", "CreateMultipartUpload") and kind == "blob":
            checksums.append(params.get("ChecksumAlgorithm") or ("SHA256" if params.get("ChecksumSHA256") else None))

    for op in ("PutObject", "UploadPart", "CreateMultipartUpload"):
        st.s3.meta.events.register(f"provide-client-params.s3.{op}", count)
    publish_synthetic(st, seed=60, n_files=2, size=32 * 1024, files={"big.bin": big})
    # whole-blob sha256 on single PUTs, CRC32 on the parts of the multipart one
    assert sent["blob"] >= 6 * MiB and set(checksums) == {"SHA256", "CRC32"}
    sent.clear()
    again = publish_synthetic(st, seed=60, n_files=2, size=32 * 1024, files={"big.bin": big}, force=True)
    assert not again.cached and sent.get("other", 0) > 0  # new manifests were written...
    assert sent.get("blob", 0) == 0  # ...and not one blob byte


def test_credentials_are_never_printed_or_written(s3_store_uri, tmp_path, monkeypatch, capsys):
    key_id, secret = "AKIAFARMTESTKEY00042", "farm-secret-Zq8pW3xY9vK2mN7"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    st = open_store(s3_store_uri)
    pub = publish_synthetic(st, seed=70, n_files=2, size=1024)
    seen = []
    for args in (["ls", "--json"], ["show", "synth", "--json"], ["pull", "synth", "--dest", tmp_path / "p", "--json"],
                 ["promote", "synth", "prod", "--json"], ["diff", "synth", "synth@prod"], ["gc", "--keep", "1", "--json"],
                 ["show", "synth@nosuch"], ["pull", "synth", "--dest", tmp_path / "q", "--gpu", "sm_90", "--json"]):
        rc, out, err = run_cli(capsys, *args, "--store", s3_store_uri)
        seen.append(out + err)
    rc, out, err = run_cli(capsys, "ls", "--store", "s3://no-such-bucket-anywhere/x")
    assert rc == 2
    seen.append(out + err)
    for k in store_keys(st):
        seen.append(st._get_bytes(k).decode("latin-1"))
    seen += [p.read_text() for p in (tmp_path / "p").rglob("*") if p.is_file() and p.suffix != ".engine"]
    text = "\n".join(seen)
    assert pub.digest in text  # the scan did read the outputs
    assert secret not in text and key_id not in text


def test_a_download_cut_off_half_way_resumes_where_it_stopped(s3_server, s3_store_uri, tmp_path, monkeypatch):
    """A GET whose body stops early (the connection closed after the
    Content-Length was promised) is resumed with ranged GETs from where it
    stopped; the blob arrives whole and verified (a body that just ended
    early would otherwise be a short file)."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_server)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("ENGINEFARM_S3_RANGED_GET_MB", "0")  # one stream per object
        st = open_store(s3_store_uri)
        data = os.urandom(3 * MiB + 12345)
        src = tmp_path / "blob.bin"
        src.write_bytes(data)
        digest, _ = st.put_blob_file(src)
        path = "/" + st.bucket + "/" + st._k(st.blob_key(digest))
        proxy.cut_gets(path, times=5)  # the first GET and four resumes are cut (more than the reader has buffers)
        st.get_blob_file(digest, tmp_path / "out.bin", size=len(data))
        assert proxy.faults["cut"] == 5
        assert (tmp_path / "out.bin").read_bytes() == data
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "out.bin"]  # no temp file left
    finally:
        proxy.close()


def test_alias_history_is_in_move_order_when_appends_race_and_clocks_lag(tmp_path, monkeypatch):
    """A history line is appended after its compare-and-swap, so two movers
    can append in the other order; and a host's clock can be behind the one
    that moved the alias before it. Each move's time is made later than the
    move it replaced, and the history is read in that order."""
    import enginefarm.store.base as base

    st = open_store(str(tmp_path / "store"))
    pubs = [publish_synthetic(st, seed=80 + i, n_files=1, size=1024) for i in range(3)]
    paths = [st.manifest_path("synth", "publish", p.key) for p in pubs]
    st.move_alias("synth", V, "canary", paths[0], pubs[0].digest, "test")
    real = base.datetime

    class Behind(real):  # this host's clock: a day behind the last mover's
        @classmethod
        def now(cls, tz=None):
            return real.now(tz) - base.timedelta(days=1)

    monkeypatch.setattr(base, "datetime", Behind)
    st.move_alias("synth", V, "canary", paths[1], pubs[1].digest, "test")
    monkeypatch.setattr(base, "datetime", real)
    st.move_alias("synth", V, "canary", paths[2], pubs[2].digest, "test")
    key = base.history_key("synth", V, "canary")
    lines = st._get_bytes(key).splitlines(keepends=True)
    st._put_bytes(key, b"".join(lines[::-1]))  # as racing appends could leave them
    hist = st.ref_history("synth", V, "canary")
    assert [h["value"]["digest"] for h in hist] == [p.digest for p in pubs]
    assert [h["value"]["previous"] for h in hist] == [None, pubs[0].digest, pubs[1].digest]
    times = [h["value"]["moved_at"] for h in hist]
    assert times == sorted(times) and len(set(times)) == 3
