"""`make demo`: build the tiny OPT recipe on the embedded defaults (Prefect's
ephemeral API, the local store under .farm/), then say where the engine
landed and how validation went."""

from __future__ import annotations

import os
import sys


def main() -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from .cli import main as cli

    recipe = os.environ.get("DEMO_RECIPE", "tiny-opt")
    code = cli(["build", recipe])
    if code not in (0, 1):
        return code
    print()
    print(f"where it landed (`enginefarm show {recipe}`):")
    cli(["show", recipe])
    print()
    print(f"generate with it: .venv/bin/enginefarm run {recipe} --prompt 'The build farm'")
    return code


if __name__ == "__main__":
    sys.exit(main())
