"""`python -m openbagel.train RECIPE ...` (the same as `openbagel train`; works under torchrun)."""

import sys

from .main import train_main

sys.exit(train_main())
