"""Write the figures of a saved run into its folder (file names in docs/figures.md).

    python scripts/plot.py runs/digits-20250101-120000

Same as ``pyrovae plot``; ``--help`` lists the flags.
"""

import sys

from pyrovae.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
