"""Retries and timeouts of every step, in one table, and the one line a
failing step writes.

Every Prefect task of the farm is made by `step_task(STEP)`, which takes its
retries, retry delays and timeout from `POLICIES[STEP]`. Two retry rules:

- "transient": retried only when the error looks like the network's fault
  (a connection or timeout error, HTTP 429 or 5xx, S3 throttling); a corrupt
  file, a bad recipe or a bug fails at once.
- "any": retried on any error except bad input (GPU steps: an Xid error or
  an out-of-memory caused by a neighbour deserves a second try).

Neither retries what no retry can fix (`is_permanent`): bad input, a
missing file, transformers' "Can't load ..." for a checkpoint without its
tokenizer or processor files, a full disk (ENOSPC: the line names the full
directory, the work directory ENGINEFARM_WORK when the file was under it,
and its size).

A failing step logs, before Prefect's traceback, one line that says which
recipe, variant and step failed, and why:

    recipe tiny-opt, variant fp32-tp1, step convert failed: SafetensorError: Error while deserializing header

and raises an error whose message is that line, so the flow run's state,
the nightly's report and the CLI all show the same sentence.

Timeouts: Prefect interrupts a step that runs on its process's main thread
(the `gpu` deployment's runs call build and validate there; a flow's fetch
too). A step in a fan-out worker thread cannot be interrupted inside a
blocking call: Prefect fails it when the call returns. There the bound that
holds is the wait for the `gpu` deployment's run (POLICIES["gpu"]). Prefect
warns about this on every such task run; that warning is filtered here
(this paragraph is its documentation).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import BadInput, FarmError, StepFailed

MINUTE, HOUR = 60, 3600


@dataclass(frozen=True)
class StepPolicy:
    retries: int
    retry_delays: tuple[int, ...]
    timeout_s: Optional[float]
    retry_on: str  # "transient" | "any"
    talks_to: str  # what makes it fail for reasons of its own (documentation)


POLICIES: dict[str, StepPolicy] = {
    # the nightly's per-recipe staleness check: the Hugging Face API for tracked branches, the store
    "check": StepPolicy(2, (10, 60), 10 * MINUTE, "transient", "the Hugging Face API, the store"),
    "fetch": StepPolicy(3, (10, 60, 300), 4 * HOUR, "transient", "the Hugging Face hub or S3, the store"),
    # ModelOpt's calibration passes over the Hugging Face model (in this process)
    "calibrate": StepPolicy(1, (30,), 4 * HOUR, "transient", "the store"),
    "convert": StepPolicy(2, (10, 60), 4 * HOUR, "transient", "the store"),
    # the Hugging Face model's outputs on the validation inputs, once per source (GPU where there is one)
    "reference": StepPolicy(1, (30,), 3 * HOUR, "transient", "the store, a GPU"),
    # tp rank processes (gloo / nccl) against the HF model: a hung rank is killed by runtime/tp.py's own timeout
    "shards": StepPolicy(1, (30,), 2 * HOUR, "transient", "the store, local rank processes"),
    # the visual component to ONNX (+ ExportedProgram), checked with ONNX Runtime
    "export": StepPolicy(1, (30,), 2 * HOUR, "transient", "the store"),
    "build": StepPolicy(1, (60,), 6 * HOUR, "any", "a GPU, the store"),
    "validate": StepPolicy(1, (60,), 3 * HOUR, "any", "a GPU, the store"),
    "publish": StepPolicy(3, (5, 30, 120), 30 * MINUTE, "transient", "the store"),
    # one variant end to end (its steps above have their own policies; this
    # only bounds the whole, GPU queueing included)
    "variant": StepPolicy(0, (), 24 * HOUR, "transient", "the steps above"),
    # how long the cpu side waits for the `gpu` deployment's run of one
    # variant (queueing for a GPU slot included)
    "gpu": StepPolicy(0, (), 12 * HOUR, "transient", "the Prefect API, a gpu worker"),
}

_TRANSIENT_NAMES = {
    "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "TimeoutError", "TimeoutException",
    "TransportError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ProtocolError", "IncompleteRead", "ChunkedEncodingError", "RemoteProtocolError",
}
_THROTTLED = {"Throttling", "ThrottlingException", "SlowDown", "RequestLimitExceeded", "ServiceUnavailable",
              "InternalError", "RequestTimeout"}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _http_status(e: BaseException) -> int:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):  # botocore ClientError
        return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return int(getattr(resp, "status_code", 0) or 0)  # requests / httpx (huggingface_hub)


def is_transient(e: BaseException) -> bool:
    """Whether an error (or one it was raised from) looks like the network's fault."""
    for x in _chain(e):
        if isinstance(x, BadInput):
            return False
        if isinstance(x, (ConnectionError, TimeoutError)):
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(x).__mro__):
            return True
        status = _http_status(x)
        if status == 429 or status >= 500:
            return True
        resp = getattr(x, "response", None)
        if isinstance(resp, dict) and resp.get("Error", {}).get("Code") in _THROTTLED:
            return True
    return False


def no_space(e: BaseException) -> Optional[OSError]:
    """The ENOSPC error that e is, or was raised from."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return x
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} GiB"


def no_space_line(x: OSError) -> str:
    """'no space left on device in the work directory D (ENGINEFARM_WORK, a 256 KiB file system) ...'.
    Its size, not what is free: by the time this line is written the step's
    scratch files are gone again."""
    env = os.environ.get("ENGINEFARM_WORK")
    work = os.path.abspath(env or tempfile.gettempdir())
    path = os.fspath(x.filename) if x.filename is not None else None
    in_work = path is None or os.path.commonpath([work, os.path.abspath(path)]) == work
    where = work
    if not in_work:  # elsewhere: the file system the file was on
        where = os.path.dirname(os.path.abspath(path))
        while not os.path.ismount(where) and os.path.dirname(where) != where:
            where = os.path.dirname(where)
    try:
        fs = os.statvfs(where)
        size = f"a {_size(fs.f_blocks * fs.f_frsize)} file system"
    except OSError:
        size = ""
    if in_work:
        named = ["ENGINEFARM_WORK" if env else "the system temp dir", size]
        what = f"the work directory {work} ({', '.join(x for x in named if x)})"
        hint = "; point ENGINEFARM_WORK at a bigger disk" if env else "; set ENGINEFARM_WORK to a bigger disk"
    else:
        what, hint = f"the file system at {where}" + (f" ({size})" if size else ""), ""
    return f"no space left on device in {what}" + (f" writing {path}" if path else "") + hint


def is_permanent(e: BaseException) -> bool:
    """Whether no retry can fix an error: bad input, a file that is not
    there, a full disk, or transformers' "Can't load ..." for a checkpoint missing files."""
    if no_space(e) is not None:  # a retry on the same disk fills it again
        return True
    for x in _chain(e):
        if isinstance(x, (BadInput, FileNotFoundError)):
            return True
        if (isinstance(x, OSError) and not isinstance(x, (ConnectionError, TimeoutError))
                and str(x).startswith("Can't load")):
            return True
    return False


def should_retry(step: str, e: BaseException) -> bool:
    pol = POLICIES[step]
    root = getattr(e, "cause", None) or e
    if is_permanent(root):
        return False
    return True if pol.retry_on == "any" else is_transient(root)


def _retry_condition(step: str):
    def retry_condition(task, task_run, state) -> bool:  # Prefect wants a plain function
        exc = state.data if isinstance(state.data, BaseException) else None
        return exc is not None and should_retry(step, exc)

    retry_condition.__name__ = f"retry_{step}"
    return retry_condition


def one_line(e: BaseException) -> str:
    full = no_space(e)
    if full is not None:
        return no_space_line(full)
    msg = " ".join(str(e).split()) or repr(e)
    name = type(e).__name__
    return msg if isinstance(e, FarmError) else f"{name}: {msg}"


def failure_line(recipe: Optional[str], variant: Optional[str], step: str, e: BaseException) -> str:
    where = ", ".join(x for x in (f"recipe {recipe}" if recipe else "", f"variant {variant}" if variant else "",
                                  f"step {step}") if x)
    return f"{where} failed: {one_line(e)}"


def _where(args: tuple, kwargs: dict) -> tuple[Optional[str], Optional[str]]:
    from ..spec import Recipe, Variant
    from .base import Ctx

    recipe = variant = None
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Ctx):
            recipe = a.recipe.name
        elif isinstance(a, Recipe):
            recipe = a.name
        elif isinstance(a, Variant):
            variant = a.name
    return recipe, variant


def _attempt(step: str, e: BaseException) -> str:
    """' (attempt 1 of 4; will retry)' when Prefect is about to retry this step."""
    try:
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
        if ctx is None or not should_retry(step, e):
            return ""
        n, total = ctx.task_run.run_count, POLICIES[step].retries + 1
        return f" (attempt {n} of {total}; will retry)" if n < total else ""
    except Exception:
        return ""


def step_failed(step: str, e: BaseException, recipe: Optional[str], variant: Optional[str]) -> FarmError:
    """The error a failing step raises: its message is the one line; the
    original error is its cause. FarmErrors keep their class (exit codes)."""
    from .base import log_error

    line = failure_line(recipe, variant, step, e)
    log_error(line + _attempt(step, e))
    out: FarmError
    try:
        out = type(e)(line) if isinstance(e, FarmError) else StepFailed(line)
    except Exception:
        out = StepFailed(line)
    out.step_line = line  # type: ignore[attr-defined]
    out.cause = e  # type: ignore[attr-defined]
    out.step, out.recipe, out.variant = step, recipe, variant  # type: ignore[attr-defined]
    return out


class _ThreadTimeoutNote(logging.Filter):
    """Drops Prefect's per-task-run note that timeouts cannot interrupt a
    blocking call in a worker thread (documented above, once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread" not in str(record.msg)


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNote())


def step_task(step: str, **task_kwargs: Any) -> Callable:
    """@step_task("fetch"): a Prefect task with the step's retries, timeout and failure line."""
    from prefect import task
    from prefect.cache_policies import NONE

    pol = POLICIES[step]

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if getattr(e, "step_line", None):  # said already, by the step that failed
                    raise
                recipe, variant = _where(args, kwargs)
                raise step_failed(step, e, recipe, variant) from e

        return task(
            name=step,
            cache_policy=NONE,  # the store is the only cache
            retries=pol.retries,
            retry_delay_seconds=list(pol.retry_delays) or None,
            retry_condition_fn=_retry_condition(step),
            timeout_seconds=pol.timeout_s,
            **task_kwargs,
        )(run)

    return deco
