"""``pyrovae evaluate``: the test-set log p(x) of a trained run.

By importance sampling (``--method is``, the default): writes evaluation.json,
evaluation_khat.png and evaluation_iwae_bound.png into the run folder. By
annealed importance sampling (``--method ais``): writes evaluation_ais.json.
BDMC on data simulated from the model (``--method bdmc``): writes bdmc.json.
See docs/marginal_likelihood.md.
"""

from __future__ import annotations

from pyrovae.cli import plain, positive_int, seed_int
from pyrovae.evaluation.marginal import (DEFAULT_DATA_BLOCK, DEFAULT_MAX_ELEMENTS,
                                         MIN_SAMPLES_FOR_KHAT, PARTICLE_ALIGNMENT)
from pyrovae.pipelines import CHECKPOINT_CHOICES, DEFAULT_NUM_SAMPLES, METHODS, evaluate_run


def add_parser(sub):
    p = sub.add_parser("evaluate", help=plain(__doc__.splitlines()[0]), description=plain(__doc__))
    p.add_argument("run_folder", metavar="RUN",
                   help="the run folder, as written by pyrovae train --out RUN")
    p.add_argument("--method", choices=METHODS, default="is",
                   help="is: importance sampling with q(z|x); ais: annealed importance "
                        "sampling, for when k-hat flags IS; bdmc: the AIS bounds on data "
                        "simulated from the model (default %(default)s)")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="last",
                   help="the weights to evaluate: last (checkpoint.pt, the end of training) or "
                        "best (best.pt, the epoch with the best validation ELBO, of a run "
                        "trained with --val-size); the summary names them (default "
                        "%(default)s)")
    p.add_argument("--num-samples", type=positive_int, metavar="K",
                   help=f"importance samples K per image (default "
                        f"{DEFAULT_NUM_SAMPLES['is']}, as in the papers; PSIS k-hat needs K >= "
                        f"{MIN_SAMPLES_FOR_KHAT}), or AIS chains per image (default "
                        f"{DEFAULT_NUM_SAMPLES['ais']})")
    p.add_argument("--ais-steps", type=positive_int, default=1000, metavar="T",
                   help="annealing steps of AIS and BDMC (default %(default)s)")
    p.add_argument("--leapfrog-steps", type=positive_int, default=10, metavar="L",
                   help="leapfrog steps of each HMC transition of AIS (default %(default)s)")
    p.add_argument("--num-simulated", type=positive_int, default=100, metavar="N",
                   help="datapoints simulated from the model for BDMC (default %(default)s)")
    p.add_argument("--max-elements", type=positive_int, default=DEFAULT_MAX_ELEMENTS,
                   metavar="N",
                   help="memory bound: (sample, image) pairs in one vectorized pass "
                        "(default %(default)s); the result does not depend on it")
    p.add_argument("--data-block", type=positive_int, default=DEFAULT_DATA_BLOCK, metavar="N",
                   help="images per pass (default %(default)s): on a GPU, a larger block "
                        "runs AIS's sequential steps once for more images. The random "
                        "numbers are seeded per block, so the estimate's noise, not its "
                        "expectation, depends on it. --max-elements must be at least "
                        f"{PARTICLE_ALIGNMENT} times N")
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
    evaluate_run(args.run_folder, args.num_samples, method=args.method,
                 num_steps=args.ais_steps, leapfrog_steps=args.leapfrog_steps,
                 num_simulated=args.num_simulated, max_elements=args.max_elements,
                 data_block=args.data_block,
                 num_images=args.num_images, subset_size=args.subset_size, seed=args.seed,
                 device=args.device, data_dir=args.data_dir, progress=not args.no_progress,
                 checkpoint=args.checkpoint)
    return 0
