"""engine.json through runtime/sidecar.py: what the builds write reads back
typed; an old, foreign or corrupt sidecar is refused with one BadInput that
says to rebuild (the CLI's exit 2), by every loader."""

import json

import pytest

from enginefarm.backends import get_backend
from enginefarm.errors import BadInput
from enginefarm.runtime import sidecar as sc
from enginefarm.runtime.engine import load_engine

LLM = {"format": "aoti-pt2", "component": "llm", "device": "cpu", "target": "cpu", "dtype": "float32",
       "file": "llm.pt2", "files": {"general": "llm.pt2"}, "max_batch_size": 2, "max_input_len": 8,
       "max_seq_len": 16, "vocab_size": 384, "hidden_size": 64, "cache_shape": [2, "batch", 4, 16, 16],
       "prompt_table": {"max_rows": 4, "hidden_size": 64},
       "inputs": [{"name": "k_cache", "dtype": "float32", "shape": ["batch", 4, 16, 16], "per_layer": 2,
                   "mutated": True}]}


def test_written_sidecar_reads_back_typed_with_its_version(tmp_path):
    s = sc.write(tmp_path, LLM)
    data = json.loads((tmp_path / "engine.json").read_text())
    assert data["version"] == sc.VERSION and data["prompt_table"] == {"max_rows": 4, "hidden_size": 64}
    r = sc.read(tmp_path)
    assert r == s and r.prompt_table.max_rows == 4 and r.inputs[0].per_layer == 2 and r.inputs[0].mutated
    # a backend's own facts ride along, typed fields stay typed
    t = sc.write(tmp_path / "trt", {"format": "tensorrt-plan", "profiles": {"x": [[1], [2], [4]]}, "device": "cuda"})
    assert sc.read(tmp_path / "trt").model_extra == {"profiles": {"x": [[1], [2], [4]]}} and t.device == "cuda"


@pytest.mark.parametrize("content,says", [
    ({k: v for k, v in LLM.items()}, "without a version"),  # built before sidecars had versions
    ({**LLM, "version": 2, "engine_form": "gpu"}, "sidecar version 2"),  # the GPU engine form's
    ({**LLM, "version": sc.VERSION, "max_batch_size": "two"}, "max_batch_size"),
    ({**LLM, "version": sc.VERSION, "prompt_table": {"rows": 4}}, "prompt_table"),
    ("{not json", "JSONDecodeError"),
    ([1, 2], "no JSON object"),
])
def test_old_or_corrupt_sidecars_are_one_bad_input(tmp_path, content, says):
    (tmp_path / "engine.json").write_text(content if isinstance(content, str) else json.dumps(content))
    for load in (sc.read, load_engine, get_backend("aoti").load, get_backend("onnxruntime").load):
        with pytest.raises(BadInput, match=says) as e:
            load(tmp_path)
        assert "\n" not in str(e.value)
        assert "rebuild" in str(e.value) or "readable" in str(e.value)


def test_missing_sidecar_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no readable engine.json"):
        load_engine(tmp_path)


def test_a_sidecar_without_what_the_loader_needs_is_refused(tmp_path):
    sc.write(tmp_path, {k: v for k, v in LLM.items() if k != "cache_shape"})
    with pytest.raises(BadInput, match="lacks cache_shape: rebuild"):
        load_engine(tmp_path)
