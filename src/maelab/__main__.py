"""``python -m maelab`` (also what ``torchrun -m maelab`` runs)."""

import sys

from maelab.cli import main

sys.exit(main())
