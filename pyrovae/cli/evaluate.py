"""``pyrovae evaluate``: importance-sampled test-set log p(x) of a trained run.

Writes evaluation.json, evaluation_khat.png and evaluation_iwae_bound.png into
the run folder (see docs/marginal_likelihood.md).
"""

from __future__ import annotations

from pyrovae.evaluation.marginal import DEFAULT_MAX_ELEMENTS
from pyrovae.pipelines import evaluate_run

DEFAULT_NUM_SAMPLES = 5000


def add_parser(sub):
    p = sub.add_parser("evaluate", help=__doc__.splitlines()[0], description=__doc__)
    p.add_argument("run_folder", metavar="RUN_FOLDER", help="a folder written by pyrovae train")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                   help=f"importance samples K per image (default {DEFAULT_NUM_SAMPLES}, as in "
                        f"the papers)")
    p.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS,
                   help="memory bound: (sample, image) pairs in one vectorized pass "
                        f"(default {DEFAULT_MAX_ELEMENTS}); the result does not depend on it")
    p.add_argument("--num-images", type=int, help="evaluate the first N test images only")
    p.add_argument("--subset-size", type=int, default=100,
                   help="test images for the IWAE-bound-against-K figure (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
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
