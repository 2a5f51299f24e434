"""`python -m enginefarm ...`: the `enginefarm` command, where its script is not on PATH."""

from .cli import main

raise SystemExit(main())
