"""Importance-sampled test-set log p(x) of a trained run folder.

    python scripts/evaluate.py runs/digits-20250101-120000 --num-samples 5000

Writes evaluation.json, evaluation_khat.png and evaluation_iwae_bound.png into
the run folder. Same as ``pyrovae evaluate``; ``--help`` lists every flag.
"""

import sys

from pyrovae.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
