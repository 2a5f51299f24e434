"""The orchestration pieces that need no build: step policies (retries,
timeouts, the one-line failure), the build form's validation, the settings,
and the staleness reason for a tracked branch that moved."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from prefect import flow

from enginefarm.errors import BadInput, StepFailed
from enginefarm.flows import settings
from enginefarm.flows.nightly import explain
from enginefarm.flows.request import BuildRequest
from enginefarm.spec import parse_recipe
from enginefarm.tasks.base import StepSpec
from enginefarm.tasks.policy import POLICIES, is_transient, should_retry, step_task


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_every_step_has_a_policy_and_network_errors_are_transient():
    for step in ("check", "fetch", "convert", "build", "validate", "publish", "variant", "gpu"):
        pol = POLICIES[step]
        assert pol.timeout_s and pol.retries == len(pol.retry_delays)
    assert is_transient(ConnectionResetError("peer"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://s3"))
    assert is_transient(_client_error(503, "SlowDown"))
    assert not is_transient(_client_error(403, "AccessDenied"))
    assert not is_transient(ValueError("bad header"))
    wrapped = StepFailed("recipe r, step fetch failed: ...")
    wrapped.cause = TimeoutError("read timed out")
    assert should_retry("fetch", wrapped)
    # GPU steps retry any error but bad input; network steps only transient ones
    assert should_retry("build", RuntimeError("CUDA error: an illegal memory access"))
    assert not should_retry("convert", RuntimeError("CUDA error"))
    assert not should_retry("build", BadInput("tp 3"))


def test_a_full_disk_is_one_line_naming_the_work_directory_and_is_not_retried(tmp_path, monkeypatch):
    import errno

    from enginefarm.tasks.policy import failure_line

    monkeypatch.setenv("ENGINEFARM_WORK", str(tmp_path))
    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = StepFailed("while writing a blob")
    wrapped.__cause__ = full
    line = failure_line("r", "v", "convert", wrapped)
    assert line.startswith(f"recipe r, variant v, step convert failed: no space left on device in the work "
                           f"directory {tmp_path} (ENGINEFARM_WORK, a "), line
    assert line.endswith(" file system); point ENGINEFARM_WORK at a bigger disk") and "\n" not in line
    named = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "scratch" / "model.safetensors"))
    assert f"writing {tmp_path}/scratch/model.safetensors" in failure_line("r", "v", "build", named)
    assert not should_retry("build", full) and not should_retry("publish", wrapped)  # "any" or not


def test_a_step_retries_a_transient_error_and_fails_bad_input_at_once_in_one_line():
    calls = {"flaky": 0, "bad": 0}
    r = parse_recipe({"name": "policy-test", "family": "opt", "source": {"tiny": "opt"}}, "policy-test.yaml")
    v = r.variants()[0]

    @step_task("publish")  # retries after 5 s on a transient error
    def flaky(recipe, variant):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    @step_task("publish")
    def bad(recipe, variant):
        calls["bad"] += 1
        raise BadInput("the bucket does not exist\n(and a second line)")

    @flow
    def f():
        return flaky(r, v), bad.submit(r, v).result(raise_on_failure=False)

    ok, err = f()
    assert ok == "ok" and calls["flaky"] == 2
    assert calls["bad"] == 1  # bad input: no retry
    assert isinstance(err, BadInput)
    assert str(err) == "recipe policy-test, variant fp16-tp1, step publish failed: the bucket does not exist (and a second line)"


def test_build_form_validates_recipe_variants_and_backend():
    ok = BuildRequest.model_validate({"recipe": "tiny-opt", "variants": ["fp32-tp1"]})
    assert ok.selected() == ["fp32-tp1"] and ok.force is False
    assert BuildRequest.model_validate({"recipe": "tiny-opt", "backend": "aoti"}).selected() == ["fp32-tp1"]
    with pytest.raises(ValueError, match="has no variant 'fp16-tp9'; its variants: fp32-tp1"):
        BuildRequest.model_validate({"recipe": "tiny-opt", "variants": ["fp16-tp9"]})
    with pytest.raises(ValueError, match=r"no variant with backend tensorrt-llm \(its backends: aoti\)"):
        BuildRequest.model_validate({"recipe": "tiny-opt", "backend": "tensorrt-llm"})
    with pytest.raises(ValueError, match="recipe"):
        BuildRequest.model_validate({"recipe": "no-such-recipe"})
    with pytest.raises(ValueError, match="extra"):
        BuildRequest.model_validate({"recipe": "tiny-opt", "store": "/tmp/x"})
    schema = BuildRequest.model_json_schema()
    assert "tiny-opt" in schema["$defs"]["CatalogRecipe"]["enum"]


def test_settings_refuse_bad_values(monkeypatch):
    monkeypatch.setenv("ENGINEFARM_TASK_RUNNER", "celery")
    with pytest.raises(BadInput, match="expected one of threads, dask, ray"):
        settings.task_runner()
    monkeypatch.setenv("ENGINEFARM_TASK_RUNNER", "threads")
    monkeypatch.setenv("ENGINEFARM_MAX_PARALLEL", "3")
    assert settings.task_runner()._max_workers == 3
    monkeypatch.setenv("ENGINEFARM_MAX_PARALLEL", "0")
    with pytest.raises(BadInput, match="ENGINEFARM_MAX_PARALLEL"):
        settings.task_runner()
    monkeypatch.setenv("ENGINEFARM_GPU_DEPLOYMENT", "gpu")
    with pytest.raises(BadInput, match="FLOW_NAME/DEPLOYMENT_NAME"):
        settings.gpu_deployment()
    monkeypatch.setenv("ENGINEFARM_GPU_DEPLOYMENT", "gpu-steps/gpu")
    assert settings.gpu_deployment() == "gpu-steps/gpu"
    assert settings.resolve_store("s3://bucket/engines") == "s3://bucket/engines"


def test_a_tracked_branch_that_moved_is_the_reason():
    r = parse_recipe({"name": "tracked", "family": "opt", "source": {"hf": "facebook/opt-125m", "track": "main"}}, "t.yaml")
    old = {"params": {"kind": "hf", "allow_pickle": False, "hf": "facebook/opt-125m", "revision": "a" * 40},
           "code_version": "c0de", "toolchain": {}}
    spec = StepSpec("fetch", {**old["params"], "revision": "b" * 40}, {}, "c0de", {})
    assert explain(r, "fetch", spec, old) == [f"upstream: branch main of facebook/opt-125m moved {'a' * 12} -> {'b' * 12}"]


def test_a_distributed_runner_is_a_setting_that_names_its_install():
    import importlib

    for kind, (module, cls, _) in settings.DISTRIBUTED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            with pytest.raises(BadInput, match=rf"pip install 'enginefarm\[{kind}\]'"):
                settings.task_runner(kind)
        else:
            assert type(settings.task_runner(kind)).__name__ == cls


def test_an_unreachable_hub_is_retried_a_missing_repo_is_bad_input(monkeypatch):
    """A tracked branch resolves through the Hugging Face API: nothing listens
    on the endpoint below (a refused connection is transient), and a hub
    that answers 404 is the recipe's fault."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from huggingface_hub import constants

    from enginefarm.tasks.fetch import resolve_branch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    # what HF_ENDPOINT sets, had it been in the environment when huggingface_hub was imported
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(StepFailed, match="tracks branch 'main', which could not be resolved") as e:
        resolve_branch("facebook/opt-125m", "main")
    assert should_retry("check", e.value)

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        def log_message(self, *a):
            pass

    hub = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{hub.server_port}")
        with pytest.raises(BadInput, match="pin a revision to build offline") as e:
            resolve_branch("nobody/nothing", "main")
        assert not should_retry("check", e.value)
    finally:
        hub.shutdown()


def test_the_cause_of_a_failed_gpu_run_is_its_step_line():
    from enginefarm.flows.gpu import _state_cause

    line = "recipe a, variant fp16-tp1, step build failed: RuntimeError: CUDA error: out of memory"

    @flow
    def gpu_like():
        raise StepFailed(line)

    state = gpu_like(return_state=True)
    assert state.is_failed() and state.message != line
    assert _state_cause(state) == line
