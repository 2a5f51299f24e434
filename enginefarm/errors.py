"""Errors that the CLI turns into exit codes.

BadInput    -> exit 2: a recipe, an argument, a ref, a path or a file is wrong.
              One clear message, no traceback, nothing lost.
StepFailed  -> exit 1: a step or a validation gate failed.
"""


class FarmError(Exception):
    exit_code = 1


class BadInput(FarmError):
    """The user's input is wrong; the message says what and where."""

    exit_code = 2


class NotAvailable(BadInput):
    """A backend or family asked for is not available here (not installed,
    not implemented yet). Reported before any heavy work."""


class StepFailed(FarmError):
    exit_code = 1


class GateFailed(StepFailed):
    """A validation gate failed: the engine was built but is not good enough."""
