"""Prefect flows: build (one recipe). Nightly, promote and gc come later."""
