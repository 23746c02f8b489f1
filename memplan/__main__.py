"""``python -m memplan ...``: the ``memplan`` command line (also under ``torchrun -m memplan``)."""

import sys

from memplan.cli import main

if __name__ == "__main__":
    sys.exit(main())
