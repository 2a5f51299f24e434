"""The tensorrt-llm runner adapter (enginefarm/backends/trtllm_runner.py).

No TensorRT-LLM here, so nothing runs an engine: these tests hold the
adapter's source to its SIGNATURES table (every keyword it passes to a
runtime call was read in TensorRT-LLM's source) and check that `load` says
plainly that it cannot run here."""

import ast
import inspect
import importlib.util

import pytest

from enginefarm.backends import trtllm_runner
from enginefarm.errors import NotAvailable

# how the adapter names the runtime objects it calls
RUNTIME_RECEIVERS = {"ModelRunnerCpp": "ModelRunnerCpp", "self.runner": "ModelRunnerCpp"}


def _runtime_calls():
    """(SIGNATURES key, call node) for every call on a runtime object in the adapter's source."""
    tree = ast.parse(inspect.getsource(trtllm_runner))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            recv = ast.unparse(node.func.value)
            if recv in RUNTIME_RECEIVERS:
                yield f"{RUNTIME_RECEIVERS[recv]}.{node.func.attr}", node


def test_every_runtime_keyword_is_in_signatures():
    calls = list(_runtime_calls())
    assert {k for k, _ in calls} == {"ModelRunnerCpp.from_dir", "ModelRunnerCpp.generate"}
    for key, node in calls:
        assert key in trtllm_runner.SIGNATURES, f"line {node.lineno}: {key} has no SIGNATURES entry"
        allowed = set(trtllm_runner.SIGNATURES[key]["params"])
        for kw in node.keywords:
            assert kw.arg is not None, f"line {node.lineno}: {key}(**...) hides its keywords from this check"
            assert kw.arg in allowed, f"line {node.lineno}: {key} is passed {kw.arg!r}, not in SIGNATURES"
        assert not node.args, f"line {node.lineno}: {key} is passed positional arguments"


def test_signatures_name_their_source():
    for key, sig in trtllm_runner.SIGNATURES.items():
        assert "tensorrt_llm/" in sig["read"] and "commit" in sig["read"], key
        assert len(set(sig["params"])) == len(sig["params"]), key


def test_sampling_keys_are_generate_keywords():
    from enginefarm.runtime.decoding import Decoding

    allowed = set(trtllm_runner.SIGNATURES["ModelRunnerCpp.generate"]["params"])
    for d in (Decoding(), Decoding(do_sample=True, top_k=5, top_p=0.9, temperature=0.7, seed=3),
              Decoding(num_beams=4, length_penalty=0.5), Decoding(repetition_penalty=1.3)):
        s = trtllm_runner.sampling(d)
        assert set(s) <= allowed
    assert trtllm_runner.sampling(Decoding())["top_k"] == 1
    s = trtllm_runner.sampling(Decoding(do_sample=True, top_k=5, top_p=0.9, temperature=0.7, seed=3))
    assert (s["top_k"], s["top_p"], s["temperature"], s["random_seed"]) == (5, 0.9, 0.7, 3)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
def test_load_says_tensorrt_llm_is_missing(tmp_path):
    from enginefarm.backends import get_backend

    with pytest.raises(NotAvailable) as e:
        get_backend("tensorrt-llm").load(tmp_path)
    msg = str(e.value)
    assert "not importable" in msg and "TensorRT-LLM" in msg and "tensorrt-llm installed" in msg


def test_build_gathers_context_logits():
    from types import SimpleNamespace

    from enginefarm.backends.tensorrt_llm import build_args

    v = SimpleNamespace(dtype="float16", tp=1)
    limits = {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64}
    assert trtllm_runner.CONTEXT_LOGITS_FLAG in build_args("C", "E", v, limits)
    assert trtllm_runner.CONTEXT_LOGITS_FLAG in build_args("C", "E", v, limits, part="decoder")
    assert trtllm_runner.CONTEXT_LOGITS_FLAG not in build_args("C", "E", v, limits, part="encoder")
