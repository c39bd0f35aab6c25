"""``python -m dynacc.gen``: see :mod:`dynacc.gen.cli`."""

from .cli import main

raise SystemExit(main())
