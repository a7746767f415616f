"""``python -m pipeline.cli``: the ``diprune`` command line (the same as the ``diprune`` entry point)."""

import sys

from pipeline.cli import main

sys.exit(main())
