"""``python -m dynacc.quant``: train/calibrate/evaluate BFP models from the command line."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
