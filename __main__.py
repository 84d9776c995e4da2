"""``python -m compquant``: the command line, as the ``compquant`` console script (and what
``torchrun ... -m compquant`` runs)."""
import sys

from .cli import main

sys.exit(main())
