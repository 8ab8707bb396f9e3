"""``python -m scot_ot CMD ...``: the ``scot-ot`` command, e.g. under ``torchrun -m scot_ot eval ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
