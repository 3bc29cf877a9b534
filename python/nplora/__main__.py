"""`python -m nplora ...` is the `nplora` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
