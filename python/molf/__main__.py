"""`python -m molf …` runs the `molf` command."""

import sys

from .cli import main

sys.exit(main())
