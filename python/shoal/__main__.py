"""`python -m shoal` is the `shoal` command (see shoal.cli)."""

import sys

from .cli import main

sys.exit(main())
