"""`python -m openbagel ...` is the `openbagel` command."""

import sys

from .cli import main

sys.exit(main())
