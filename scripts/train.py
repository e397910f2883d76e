"""Train a VAE with Pyro's SVI and write a run folder (config.json, checkpoint.pt, metrics.json).

    python scripts/train.py --dataset digits --epochs 30
    python scripts/train.py --dataset mnist --data-dir ../shared/data --prior laplace --guide student-t

Same as ``pyrovae train``; ``--help`` lists every flag.
"""

import sys

from pyrovae.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
