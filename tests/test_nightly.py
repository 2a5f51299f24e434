"""The nightly flow on Prefect's ephemeral API, GPU steps in process: a
catalog where one recipe's source is broken (the others finish, exactly that
failure is reported, with its cause, in the run's artifacts), then a night
where nothing changed (nothing built, no weight file read), the staleness
reasons, and `enginefarm report`."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from enginefarm.cli import main as cli
from enginefarm.flows.build import plan
from enginefarm.flows.nightly import explain, nightly, staleness
from enginefarm.flows.report import NIGHTLY
from enginefarm.families import load_recipe
from enginefarm.store import open_store
from enginefarm.tasks import validate as validate_step
from enginefarm.tasks.base import Ctx
from enginefarm.testing import write_tiny
from helpers import SPY, recipe_for


def _artifacts(flow_run_id) -> dict[str, object]:
    """The flow run's artifacts by key (tables decoded)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    out = {}
    for a in arts:
        out[a.key] = json.loads(a.data) if a.type == "table" else a.data
    return out


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A catalog of two recipes, one with a broken source, after its first night."""
    tmp = tmp_path_factory.mktemp("nightly")
    good_src = write_tiny("opt", tmp / "good-src", seed=7)
    broken_src = write_tiny("opt", tmp / "broken-src", seed=8)
    (broken_src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    catalog = tmp / "catalog"
    catalog.mkdir()
    recipe_for(catalog, "good-opt", "opt", good_src)
    recipe_for(catalog, "broken-opt", "opt", broken_src)
    store = str(tmp / "store")
    state = nightly(catalog=str(catalog), store=store, return_state=True)
    return {"tmp": tmp, "catalog": catalog, "store": store, "state": state, "good_src": good_src}


def test_broken_source_fails_alone_with_its_cause_in_the_artifacts(farm):
    state = farm["state"]
    assert state.is_failed()
    assert state.message == "1 of 2 variants failed: broken-opt:fp32-tp1"
    summary = state.result(raise_on_failure=False)
    assert summary["counts"] == {"built": 1, "up to date": 0, "failed": 1, "skipped": 0}

    arts = _artifacts(state.state_details.flow_run_id)
    table = arts["nightly-variants"]
    failed = [r for r in table if r["status"] == "failed"]
    assert len(failed) == 1
    assert (failed[0]["recipe"], failed[0]["variant"]) == ("broken-opt", "fp32-tp1")
    # which recipe, variant and step, and why, in one line
    assert failed[0]["why"].startswith("recipe broken-opt, variant fp32-tp1, step convert failed: corrupt safetensors file ")
    assert failed[0]["why"].endswith("model.safetensors: Error while deserializing header: invalid header length")
    assert "\n" not in failed[0]["why"]
    assert failed[0]["why"] in arts["nightly-summary"]
    good = [r for r in table if r["recipe"] == "good-opt"]
    assert len(good) == 1 and good[0]["status"] == "built" and good[0]["validation"] == "passed"
    assert good[0]["why"] == "never built" and good[0]["build_s"] > 0 and good[0]["size_mb"] > 0
    assert arts["nightly-plot"].startswith("data:image/png;base64,")
    st = open_store(farm["store"])
    assert st.get_ref("good-opt", "fp32-tp1", "validated")[0]["manifest"] == good[0]["manifest"]
    assert arts["nightly-good-opt-fp32-tp1-manifest"].endswith(f"({(st.root / good[0]['manifest']).as_uri()})")
    assert st.get_ref("broken-opt", "fp32-tp1", "latest") is None
    assert arts["nightly-record"].endswith(f"({(st.root / summary['record']).as_uri()})")


def test_unchanged_night_builds_nothing_and_reads_no_weight_file(farm, capsys):
    catalog = farm["catalog"]
    (catalog / "broken-opt.yaml").unlink()
    store_dir = open_store(farm["store"]).root
    with SPY.watch(farm["good_src"], store_dir / "blobs"):
        assert cli(["nightly", "--catalog", str(catalog), "--store", farm["store"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"] == {"built": 0, "up to date": 1, "failed": 0, "skipped": 0}
    assert SPY.hits == [], f"an unchanged night opened {SPY.hits}"

    # two nights in the store: `enginefarm report` draws them
    png = farm["tmp"] / "nights.png"
    assert cli(["report", "--store", farm["store"], "--out", str(png), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [n["counts"]["failed"] for n in rep["nights"]] == [1, 0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(open_store(farm["store"]).list_reports(NIGHTLY)) == 2


def test_staleness_says_what_changed(farm, tmp_path):
    st = open_store(farm["store"])
    path = farm["catalog"] / "good-opt.yaml"
    r = load_recipe(str(path))
    v = r.variants()[0]
    assert not staleness(r, [v], st)[v.name].stale

    # the recipe's validation settings: the reference (and validate, publish) are stale, nothing before;
    # the first stale step says which setting changed
    data = yaml.safe_load(path.read_text())
    data["validation"]["max_new_tokens"] = 8
    edited = tmp_path / "good-opt.yaml"
    edited.write_text(yaml.safe_dump(data))
    verdict = staleness(load_recipe(str(edited)), [v], st)[v.name]
    assert verdict.stale and verdict.reasons == ["recipe changed: reference max_new_tokens"]

    # the source: a weight file rewritten (new mtime) makes fetch stale
    w = farm["good_src"] / "model.safetensors"
    before = w.stat()
    try:
        os.utime(w, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        verdict = staleness(r, [v], st)[v.name]
        assert verdict.reasons == ["source files changed: model.safetensors"]
    finally:
        os.utime(w, ns=(before.st_atime_ns, before.st_mtime_ns))

    # code and toolchain: the step's spec against the manifest it had
    _, complete = plan(r, [v], st)
    steps = complete[v.name]
    spec = validate_step.spec(Ctx(store=st, recipe=r), steps["fetch"], steps["build.llm"], v)
    old = steps["validate"].manifest
    spec.toolchain = {**spec.toolchain, "torch": "9.9.9"}
    spec.code = "0" * 16
    assert explain(r, "validate", spec, old) == [
        f"validate code changed ({old['code_version'][:8]} -> 00000000)",
        f"validate toolchain changed: torch {old['toolchain']['torch']} -> 9.9.9",
    ]


def test_bad_catalog_exits_2(tmp_path, capsys):
    assert cli(["nightly", "--catalog", str(tmp_path / "nope")]) == 2
    assert "not a directory of recipes" in capsys.readouterr().err
    assert cli(["report", "--store", str(tmp_path / "empty")]) == 2
    assert "no nightly runs recorded" in capsys.readouterr().err


def test_a_variant_built_tonight_that_fails_its_gates_is_a_failure(farm):
    from dataclasses import replace

    from enginefarm.flows import report

    st = open_store(farm["store"])
    r = load_recipe(str(farm["catalog"] / "good-opt.yaml"))
    v = r.variants()[0]
    steps = staleness(r, [v], st)[v.name].steps
    assert report.row(st, r.name, v.name, steps)["status"] == "up to date"
    val = steps["validate"]
    gates = {**val.results["gates"], "logits_max_abs_diff": {"value": 0.5, "limit": 0.001, "passed": False}}
    failing = replace(val, cached=False, manifest={**val.manifest, "results": {**val.results, "passed": False, "status": "failed",
                                                                       "gates": gates}})
    row = report.row(st, r.name, v.name, {**steps, "validate": failing}, ["never built"])
    assert row["status"] == "failed" and row["validation"] == "failed"
    assert row["why"] == ("recipe good-opt, variant fp32-tp1: validation gates failed: logits_max_abs_diff "
                          "(published as latest, not validated); stale because never built")
    # known to fail, nothing new tonight: up to date (its validation column says failed)
    assert report.row(st, r.name, v.name, {**steps, "validate": replace(failing, cached=True)})["status"] == "up to date"


def test_an_unchanged_night_costs_at_most_two_store_requests_a_variant(farm, tmp_path, monkeypatch):
    """K variants (good-opt and K-1 copies of it under other names, recorded
    by the farm's own step code), counted at the store interface: the second
    unchanged night (the first one writes the store's index) makes at most
    2K + c requests, c for the night itself (index, listings, its record,
    the last night read back for the plot)."""
    import shutil

    from enginefarm.store.local import LocalStore
    from enginefarm.testing.clone import record_like

    store = tmp_path / "store"
    shutil.copytree(farm["store"], store)
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    shutil.copy(farm["catalog"] / "good-opt.yaml", catalog)
    k = 6
    for i in range(1, k):
        path = recipe_for(catalog, f"copy{i}-opt", "opt", farm["good_src"])
        record_like(open_store(str(store)), str(path), str(catalog / "good-opt.yaml"))

    calls: list[str] = []
    for name in ("_exists", "_put_bytes", "_put_file", "_get_bytes", "_get_file", "_list", "_list_versions",
                 "_get_with_version", "_cas", "_delete"):
        fn = LocalStore.__dict__[name]
        monkeypatch.setattr(LocalStore, name, lambda self, *a, _fn=fn, _n=name, **kw: (calls.append(_n), _fn(self, *a, **kw))[1])
    counts = []
    with SPY.watch(farm["good_src"], store / "blobs"):
        for _ in range(2):
            calls.clear()
            state = nightly(catalog=str(catalog), store=str(store), nights=1, return_state=True)
            assert state.is_completed(), state.message
            assert state.result()["counts"] == {"built": 0, "up to date": k, "failed": 0, "skipped": 0}
            counts.append(len(calls))
    assert SPY.hits == [], f"an unchanged night opened {SPY.hits}"
    assert counts[1] <= 2 * k + 10, f"{counts[1]} store requests for {k} unchanged variants: {sorted(calls)}"
