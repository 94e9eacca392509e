"""``python -m skscoreflow``: the command line (:func:`skscoreflow.cli.main`)."""

import sys

from .cli import main

__all__: list[str] = []

sys.exit(main())
