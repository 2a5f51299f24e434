"""Prefect tasks, one module a step: fetch, convert, build, validate, publish.

Each module has `spec(...)` (the step's parameters, inputs, code and
toolchain: everything its cache key is made of, computed without reading
weights) and a Prefect `@task` that runs it through `base.run_step`.
"""
