"""``pyrovae train``: fit a VAE with SVI and write a run folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyro

from pyrovae.cli import parse_key_values, plain, positive_int
from pyrovae.errors import PyrovaeError
from pyrovae.data import BINARIZE_MODES, DATASET_NAMES, load_dataset
from pyrovae.families import (
    GUIDES,
    LIKELIHOODS,
    PRIORS,
    check_supports,
    make_guide,
    make_likelihood,
    make_prior,
)
from pyrovae.networks import ACTIVATIONS
from pyrovae.objectives import ESTIMATORS, OBJECTIVES
from pyrovae.pipelines import evaluate_test_set
from pyrovae.run import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    DIGITS_BATCH_SIZE,
    METRICS_FILE,
    ModelConfig,
    claim_folder,
    read_config,
)
from pyrovae.training import Trainer, TrainConfig
from pyrovae.vae import VAE

log = logging.getLogger("pyrovae")

MODEL, TRAINING = ModelConfig(), TrainConfig()  # the defaults
D = " (default %(default)s)"  # argparse fills in each flag's default


def add_parser(sub):
    p = sub.add_parser("train", help=plain(__doc__), description=plain(__doc__))
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=TRAINING.dataset, choices=DATASET_NAMES,
                      help="the data set (default %(default)s; see docs/datasets.md)")
    data.add_argument("--data-dir", help="folder with the data files (default: $PYROVAE_DATA_DIR, "
                      "else torchvision downloads mnist and fashion-mnist)")
    data.add_argument("--binarize", choices=BINARIZE_MODES,
                      help="how grey values become 0 or 1, e.g. dynamic: resampled every "
                           "batch (see docs/datasets.md); default: static for binarized-mnist, "
                           "which is already binary, threshold for digits and dynamic for the "
                           "others with --likelihood bernoulli, none for the other "
                           "likelihoods")
    model = p.add_argument_group("model")
    model.add_argument("--prior", default="normal", choices=sorted(PRIORS),
                       help="the prior p(z)" + D)
    model.add_argument("--prior-param", action="append", metavar="KEY=VALUE",
                       help="a prior parameter, e.g. df=3 or scale=0.5 (repeatable)")
    model.add_argument("--learn-prior", action="store_true", help="learn the prior's parameters")
    model.add_argument("--guide", default="normal", choices=sorted(GUIDES),
                       help="the guide family q(z|x)" + D)
    model.add_argument("--guide-param", action="append", metavar="KEY=VALUE",
                       help="a guide parameter, e.g. df=5 or learn_df=false for the student-t "
                            "guide (repeatable)")
    model.add_argument("--likelihood", default="bernoulli", choices=sorted(LIKELIHOODS),
                       help="the likelihood p(x|z)" + D)
    model.add_argument("--likelihood-param", action="append", metavar="KEY=VALUE",
                       help="a likelihood parameter, e.g. scale=0.1 (gaussian-fixed) or "
                            "sigma=per-datapoint (gaussian) (repeatable)")
    model.add_argument("--z-dim", type=positive_int, default=MODEL.z_dim, metavar="N",
                       help="latent dimensions" + D)
    model.add_argument("--hidden", type=positive_int, nargs="+", default=list(MODEL.hidden),
                       metavar="N", help="hidden layer sizes of the MLP encoder and decoder, "
                       f"e.g. --hidden 500 500 (default {' '.join(map(str, MODEL.hidden))})")
    model.add_argument("--activation", default=MODEL.activation, choices=sorted(ACTIVATIONS),
                       help="the networks' activation" + D)
    fit = p.add_argument_group("training")
    fit.add_argument("--elbo", default=TRAINING.elbo, choices=sorted(OBJECTIVES),
                     help="trace: Monte Carlo ELBO; meanfield: analytic KL where one exists; "
                          "iwae: the importance-weighted bound over --num-particles" + D)
    fit.add_argument("--num-particles", type=int, default=TRAINING.num_particles, metavar="N",
                     help="particles per datapoint, vectorized" + D)
    fit.add_argument("--estimator", default=TRAINING.estimator, choices=ESTIMATORS,
                     help="gradient estimator: reparam (Pyro's), stl (sticking the landing; "
                          "trace or iwae), dreg (doubly reparameterized; iwae)" + D)
    fit.add_argument("--beta", type=float, default=TRAINING.beta,
                     help="KL weight, at least 0 (trace, meanfield); the log still reports "
                          "the true ELBO" + D)
    fit.add_argument("--kl-anneal", type=int, default=TRAINING.kl_anneal, metavar="EPOCHS",
                     help="raise the KL weight linearly from --kl-anneal-start in epoch 1 to "
                          "--beta in epoch EPOCHS+1; 0: no annealing" + D)
    fit.add_argument("--kl-anneal-start", type=float, default=TRAINING.kl_anneal_start,
                     help="the KL weight in epoch 1 with --kl-anneal" + D)
    fit.add_argument("--free-bits", type=float, default=TRAINING.free_bits, metavar="NATS",
                     help="free bits per latent dimension (Kingma et al. 2016); 0: none" + D)
    fit.add_argument("--aggressive", action="store_true",
                     help="aggressive inference-network training (He et al. 2019) until the "
                          "mutual information I(x;z) plateaus")
    fit.add_argument("--aggressive-patience", type=int, default=TRAINING.aggressive_patience,
                     metavar="EPOCHS",
                     help="epochs without a new highest I(x;z) that end --aggressive" + D)
    fit.add_argument("--no-jit", action="store_true",
                     help="run the SVI step eagerly; by default the trace and meanfield steps "
                          "are compiled by pyro.ops.jit (same loss, less Python per step)")
    fit.add_argument("--epochs", type=int, metavar="N",
                     help=f"total epochs (default {TRAINING.epochs}; with --resume, the "
                          "run's own)")
    fit.add_argument("--batch-size", type=int, metavar="N",
                     help=f"training images per step (default {DIGITS_BATCH_SIZE} for digits, "
                          f"else {TRAINING.batch_size})")
    fit.add_argument("--lr", type=float, default=TRAINING.lr,
                     help="Adam learning rate, a positive number" + D)
    fit.add_argument("--seed", type=int, default=TRAINING.seed,
                     help="seeds the weights, the sampling and the data order, 0 to "
                          "2**32 - 1" + D)
    fit.add_argument("--device", default=TRAINING.device,
                     help="cpu, cuda or auto (cuda when available)" + D)
    fit.add_argument("--out", metavar="RUN",
                     help="the run folder RUN to write (default: runs/DATASET-TIME); an "
                          "earlier run in it is never overwritten")
    fit.add_argument("--resume", action="store_true",
                     help="continue the run in --out RUN up to --epochs; model flags are "
                          "read from its config.json")
    fit.add_argument("--overwrite", action="store_true",
                     help="replace an earlier pyrovae run in --out RUN (a folder holding other "
                          "files is never cleared)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    fit.add_argument("--eval-samples", type=positive_int, metavar="K",
                     help="at the end, estimate the test-set log p(x) with K importance samples "
                          "(as pyrovae evaluate; papers use 5000; default: no evaluation)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    progress = not args.no_progress
    trainer = resume_trainer(args, progress) if args.resume else build_trainer(args, progress)
    metrics = trainer.fit()
    if trainer.interrupted:
        return 130
    summarize(trainer, metrics)
    # the run is saved: the figures and the evaluation are extras, and a failure in one
    # is reported with the command that retries it
    try:
        from pyrovae.plots import write_figures  # matplotlib loads only once training is done

        figures = write_figures(trainer.out, trainer.vae, trainer.data, metrics,
                                seed=trainer.config.seed)
        log.info(f"figures: {', '.join(path.name for path in figures)}")
    except Exception as error:  # noqa: BLE001
        log.warning(f"the figures failed ({type(error).__name__}: {error}); the run is saved. "
                    f"Retry with: pyrovae plot {trainer.out}")
    if args.eval_samples:
        evaluate_test_set(trainer.out, trainer.vae, trainer.data, args.eval_samples,
                          seed=trainer.config.seed, progress=progress)
    return 0


# flags of `pyrovae train` that describe the model, and cannot change when a run resumes
MODEL_FLAGS = ("prior", "prior_param", "learn_prior", "guide", "guide_param", "likelihood",
               "likelihood_param", "z_dim", "hidden", "activation")
# flags that only steer this command, not the run
COMMAND_FLAGS = ("out", "resume", "no_progress", "eval_samples", "overwrite")


def resume_trainer(args, progress: bool) -> Trainer:
    """Continue the run in --out, with the training flags given now applied and the
    model flags refused (they would make another run)."""
    if not args.out:
        raise PyrovaeError("--resume needs --out: the run folder to continue.")
    saved = read_config(args.out)["model"]
    model = sorted(flag for flag in args.given if flag in MODEL_FLAGS
                   and not _as_saved(flag, getattr(args, flag), saved))
    if model:
        raise PyrovaeError(
            f"{', '.join('--' + flag.replace('_', '-') for flag in model)} cannot change when a "
            f"run resumes: the model is the saved one. Start a new run with another --out.")
    changes = {flag: getattr(args, flag) for flag in args.given
               if flag not in MODEL_FLAGS + COMMAND_FLAGS and flag != "no_jit"}
    if "no_jit" in args.given:
        changes["jit"] = not args.no_jit
    trainer = Trainer.resume(args.out, progress=progress, **changes)
    log.info(f"resuming {args.out} at epoch {trainer.epoch} of {trainer.config.epochs}")
    return trainer


def _as_saved(flag: str, value, saved: dict) -> bool:
    """Whether a model flag given again on resume repeats the saved value (which is no
    change); the family parameters are compared as the families saved them."""
    if flag in ("z_dim", "activation"):
        return value == saved[flag]
    if flag == "hidden":
        return list(value) == saved["hidden"]
    if flag in ("prior", "guide", "likelihood"):
        return value == saved[flag]["name"]
    return False


def build_trainer(args, progress: bool) -> Trainer:
    """The Trainer of a new run. Every flag is checked before the data is loaded,
    except the likelihood's parameters, which need the data's shape."""
    out = Path(args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, binarize=args.binarize,
                         elbo=args.elbo, num_particles=args.num_particles,
                         epochs=TRAINING.epochs if args.epochs is None else args.epochs,
                         batch_size=TrainConfig.default_batch_size(args.dataset)
                         if args.batch_size is None else args.batch_size,
                         lr=args.lr, seed=args.seed, device=args.device,
                         estimator=args.estimator, beta=args.beta, kl_anneal=args.kl_anneal,
                         kl_anneal_start=args.kl_anneal_start, free_bits=args.free_bits,
                         aggressive=args.aggressive,
                         aggressive_patience=args.aggressive_patience,
                         jit=not args.no_jit).validate()
    prior_kwargs = parse_key_values(args.prior_param, "--prior-param")
    if args.learn_prior:
        prior_kwargs["learnable"] = True
    guide_kwargs = parse_key_values(args.guide_param, "--guide-param")
    likelihood_kwargs = parse_key_values(args.likelihood_param, "--likelihood-param")
    check_supports(
        _family("--prior-param", "prior", args.prior, make_prior, args.z_dim, prior_kwargs),
        _family("--guide-param", "guide", args.guide, make_guide, args.z_dim, guide_kwargs))
    # after every check of the flags (a refused command leaves no folder, and --overwrite
    # clears nothing), before the data load and the training
    claim_folder(out, args.overwrite)
    binarize = config.resolved_binarize(args.likelihood)
    config.binarize = binarize
    data = load_dataset(config.dataset, config.data_dir, binarize=binarize, seed=config.seed)
    _family("--likelihood-param", "likelihood", args.likelihood, make_likelihood, data.x_shape,
            likelihood_kwargs)
    pyro.set_rng_seed(config.seed)  # the networks' initial weights depend on the seed alone
    vae = VAE(data.x_shape, z_dim=args.z_dim, prior=args.prior, guide=args.guide,
              likelihood=args.likelihood, hidden=tuple(args.hidden), activation=args.activation,
              prior_kwargs=prior_kwargs, guide_kwargs=guide_kwargs,
              likelihood_kwargs=likelihood_kwargs)
    log.info(f"{config.dataset}: {len(data.train)} train / {len(data.test)} test images of "
             f"{data.x_shape}, binarize={binarize}; prior={args.prior} guide={args.guide} "
             f"likelihood={args.likelihood} z_dim={args.z_dim} elbo={config.elbo} "
             f"estimator={config.estimator}; "
             f"run folder {out}")
    return Trainer(vae, data, config, out=out, progress=progress, overwrite=args.overwrite)


def _family(flag: str, kind: str, name: str, make, size, kwargs: dict):
    """The family ``name`` built with the user's ``kwargs``, to refuse bad parameters
    before any work. A family that does not check its parameters may fail with a
    TypeError or ValueError of torch's: that is the user's input too, named by its flag."""
    try:
        return make(name, size, **kwargs)
    except PyrovaeError:
        raise
    except (TypeError, ValueError) as error:
        given = " ".join(f"{flag} {key}={value}" for key, value in kwargs.items())
        raise PyrovaeError(f"the {kind} {name!r} refused {given or 'its defaults'}: {error}"
                           ) from None


def summarize(trainer: Trainer, metrics: list[dict]) -> None:
    last = metrics[-1]
    log.info(f"done: {last['epoch']} epochs, test ELBO {last['test_elbo']:.3f} nats per "
             f"datapoint (KL {last['kl']:.3f}, recon {last['recon']:.3f}); "
             f"{sum(m['seconds'] for m in metrics):.1f} s of training. "
             f"Outputs in {trainer.out}: {CONFIG_FILE}, {CHECKPOINT_FILE}, {METRICS_FILE}.")
