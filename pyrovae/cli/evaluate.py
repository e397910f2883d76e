"""``pyrovae evaluate``: importance-sampled test-set log p(x) of a trained run.

Writes evaluation.json, evaluation_khat.png and evaluation_iwae_bound.png into
the run folder (see docs/marginal_likelihood.md).
"""

from __future__ import annotations

from pyrovae.cli import plain, positive_int, seed_int
from pyrovae.evaluation.marginal import DEFAULT_MAX_ELEMENTS, MIN_SAMPLES_FOR_KHAT
from pyrovae.pipelines import evaluate_run

DEFAULT_NUM_SAMPLES = 5000


def add_parser(sub):
    p = sub.add_parser("evaluate", help=plain(__doc__.splitlines()[0]), description=plain(__doc__))
    p.add_argument("run_folder", metavar="RUN",
                   help="the run folder, as written by pyrovae train --out RUN")
    p.add_argument("--num-samples", type=positive_int, default=DEFAULT_NUM_SAMPLES, metavar="K",
                   help="importance samples K per image (default %(default)s, as in the "
                        f"papers); PSIS k-hat needs K >= {MIN_SAMPLES_FOR_KHAT}")
    p.add_argument("--max-elements", type=positive_int, default=DEFAULT_MAX_ELEMENTS,
                   metavar="N",
                   help="memory bound: (sample, image) pairs in one vectorized pass "
                        "(default %(default)s); the result does not depend on it")
    p.add_argument("--num-images", type=positive_int, metavar="N",
                   help="evaluate the first N test images only (default: all of them)")
    p.add_argument("--subset-size", type=positive_int, default=100, metavar="N",
                   help="test images for the IWAE-bound-against-K figure (default %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seeds the importance samples, 0 to 2**32 - 1 (default %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or auto (cuda when available) (default %(default)s)")
    p.add_argument("--data-dir", help="folder with the data files (default: the run's, else "
                                      "$PYROVAE_DATA_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    evaluate_run(args.run_folder, args.num_samples, max_elements=args.max_elements,
                 num_images=args.num_images, subset_size=args.subset_size, seed=args.seed,
                 device=args.device, data_dir=args.data_dir, progress=not args.no_progress)
    return 0
