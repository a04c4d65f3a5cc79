"""`python -m specpeft`: the `specpeft` command line (specpeft/cli.py)."""

import sys

from .cli import main

sys.exit(main())
