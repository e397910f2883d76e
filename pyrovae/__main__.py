"""``python -m pyrovae``: the ``pyrovae`` command, for launchers that run a module,
such as ``torchrun --nproc_per_node N -m pyrovae train ...`` (docs/training.md)."""

import sys

from pyrovae.cli import main

if __name__ == "__main__":
    sys.exit(main())
