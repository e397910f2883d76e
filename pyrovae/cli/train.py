"""``pyrovae train``: fit a VAE with SVI and write a run folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyro

from pyrovae.cli import parse_key_values
from pyrovae.data import BINARIZE_MODES, DATASET_NAMES, load_dataset
from pyrovae.families import GUIDES, LIKELIHOODS, PRIORS
from pyrovae.networks import ACTIVATIONS
from pyrovae.objectives import ESTIMATORS, OBJECTIVES
from pyrovae.pipelines import evaluate_test_set
from pyrovae.run import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, ModelConfig, holds_run
from pyrovae.training import Trainer, TrainConfig
from pyrovae.vae import VAE

log = logging.getLogger("pyrovae")

MODEL, TRAINING = ModelConfig(), TrainConfig()  # the defaults


def add_parser(sub):
    p = sub.add_parser("train", help=__doc__, description=__doc__)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=DATASET_NAMES)
    data.add_argument("--data-dir", help="folder with the data files (default: $PYROVAE_DATA_DIR, "
                      "else torchvision downloads mnist and fashion-mnist)")
    data.add_argument("--binarize", choices=BINARIZE_MODES,
                      help="default: dynamic for --likelihood bernoulli, none otherwise")
    model = p.add_argument_group("model")
    model.add_argument("--prior", default="normal", choices=sorted(PRIORS))
    model.add_argument("--prior-param", action="append", metavar="KEY=VALUE",
                       help="a prior parameter, e.g. df=3 or scale=0.5 (repeatable)")
    model.add_argument("--learn-prior", action="store_true", help="learn the prior's parameters")
    model.add_argument("--guide", default="normal", choices=sorted(GUIDES))
    model.add_argument("--guide-param", action="append", metavar="KEY=VALUE",
                       help="e.g. df=5 learn_df=false for the student-t guide")
    model.add_argument("--likelihood", default="bernoulli", choices=sorted(LIKELIHOODS))
    model.add_argument("--likelihood-param", action="append", metavar="KEY=VALUE",
                       help="e.g. scale=0.1 (gaussian-fixed), sigma=per-datapoint (gaussian)")
    model.add_argument("--z-dim", type=int, default=MODEL.z_dim)
    model.add_argument("--hidden", type=int, nargs="+", default=list(MODEL.hidden))
    model.add_argument("--activation", default=MODEL.activation, choices=sorted(ACTIVATIONS))
    fit = p.add_argument_group("training")
    fit.add_argument("--elbo", default="trace", choices=sorted(OBJECTIVES),
                     help="trace: Monte Carlo ELBO; meanfield: analytic KL where one exists; "
                          "iwae: the importance-weighted bound over --num-particles")
    fit.add_argument("--num-particles", type=int, default=1)
    fit.add_argument("--estimator", default="reparam", choices=ESTIMATORS,
                     help="gradient estimator: reparam (Pyro's), stl (sticking the landing; "
                          "trace or iwae), dreg (doubly reparameterized; iwae)")
    fit.add_argument("--beta", type=float, default=1.0,
                     help="KL weight (trace, meanfield); the log still reports the true ELBO")
    fit.add_argument("--kl-anneal", type=int, default=0, metavar="EPOCHS",
                     help="raise the KL weight linearly from --kl-anneal-start in epoch 1 to "
                          "--beta in epoch EPOCHS+1")
    fit.add_argument("--kl-anneal-start", type=float, default=0.0)
    fit.add_argument("--free-bits", type=float, default=0.0, metavar="NATS",
                     help="free bits per latent dimension (Kingma et al. 2016)")
    fit.add_argument("--aggressive", action="store_true",
                     help="aggressive inference-network training (He et al. 2019) until the "
                          "mutual information I(x;z) plateaus")
    fit.add_argument("--aggressive-patience", type=int, default=5, metavar="EPOCHS",
                     help="epochs without a new highest I(x;z) that end --aggressive")
    fit.add_argument("--no-jit", action="store_true",
                     help="run the SVI step eagerly; by default the trace and meanfield steps "
                          "are compiled by pyro.ops.jit (same loss, less Python per step)")
    fit.add_argument("--epochs", type=int, help=f"total epochs (default {TRAINING.epochs})")
    fit.add_argument("--batch-size", type=int, default=128)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="auto", help="cpu, cuda or auto")
    fit.add_argument("--out", help="run folder (default: runs/DATASET-TIME)")
    fit.add_argument("--resume", action="store_true",
                     help="continue the run in --out up to --epochs; model flags are read "
                          "from its config.json")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    fit.add_argument("--eval-samples", type=int, metavar="K",
                     help="at the end, estimate the test-set log p(x) with K importance samples "
                          "(as pyrovae evaluate; papers use 5000)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    progress = not args.no_progress
    if args.resume:
        if not args.out:
            raise SystemExit("--resume needs --out: the run folder to continue.")
        trainer = Trainer.resume(args.out, epochs=args.epochs, progress=progress,
                                 jit=False if args.no_jit else None)
        log.info(f"resuming {args.out} at epoch {trainer.epoch} of {trainer.config.epochs}")
    else:
        trainer = build_trainer(args, progress)
    metrics = trainer.fit()
    if trainer.interrupted:
        return 130
    summarize(trainer, metrics)
    from pyrovae.plots import write_figures  # matplotlib loads only once training is done

    figures = write_figures(trainer.out, trainer.vae, trainer.data, metrics,
                            seed=trainer.config.seed)
    log.info(f"figures: {', '.join(path.name for path in figures)}")
    if args.eval_samples:
        evaluate_test_set(trainer.out, trainer.vae, trainer.data, args.eval_samples,
                          seed=trainer.config.seed, progress=progress)
    return 0


def build_trainer(args, progress: bool) -> Trainer:
    out = Path(args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if holds_run(out):
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it, or choose "
                         f"another --out (nothing was overwritten).")
    config = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, binarize=args.binarize,
                         elbo=args.elbo, num_particles=args.num_particles,
                         epochs=args.epochs or TRAINING.epochs, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, device=args.device,
                         estimator=args.estimator, beta=args.beta, kl_anneal=args.kl_anneal,
                         kl_anneal_start=args.kl_anneal_start, free_bits=args.free_bits,
                         aggressive=args.aggressive,
                         aggressive_patience=args.aggressive_patience, jit=not args.no_jit)
    binarize = config.resolved_binarize(args.likelihood)
    config.binarize = binarize
    data = load_dataset(config.dataset, config.data_dir, binarize=binarize, seed=config.seed)
    prior_kwargs = parse_key_values(args.prior_param, "--prior-param")
    if args.learn_prior:
        prior_kwargs["learnable"] = True
    pyro.set_rng_seed(config.seed)  # the networks' initial weights depend on the seed alone
    vae = VAE(data.x_shape, z_dim=args.z_dim, prior=args.prior, guide=args.guide,
              likelihood=args.likelihood, hidden=tuple(args.hidden), activation=args.activation,
              prior_kwargs=prior_kwargs,
              guide_kwargs=parse_key_values(args.guide_param, "--guide-param"),
              likelihood_kwargs=parse_key_values(args.likelihood_param, "--likelihood-param"))
    log.info(f"{config.dataset}: {len(data.train)} train / {len(data.test)} test images of "
             f"{data.x_shape}, binarize={binarize}; prior={args.prior} guide={args.guide} "
             f"likelihood={args.likelihood} z_dim={args.z_dim} elbo={config.elbo} "
             f"estimator={config.estimator}; "
             f"run folder {out}")
    return Trainer(vae, data, config, out=out, progress=progress)


def summarize(trainer: Trainer, metrics: list[dict]) -> None:
    last = metrics[-1]
    log.info(f"done: {last['epoch']} epochs, test ELBO {last['test_elbo']:.3f} nats per "
             f"datapoint (KL {last['kl']:.3f}, recon {last['recon']:.3f}); "
             f"{sum(m['seconds'] for m in metrics):.1f} s of training. "
             f"Outputs in {trainer.out}: {CONFIG_FILE}, {CHECKPOINT_FILE}, {METRICS_FILE}.")
