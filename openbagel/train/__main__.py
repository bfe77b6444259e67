"""`python -m openbagel.train RECIPE ...` (the same as `openbagel train`, errors included; works under torchrun)."""

import sys

from openbagel.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
