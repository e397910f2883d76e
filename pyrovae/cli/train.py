"""``pyrovae train``: fit a VAE with SVI and write a run folder."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from pathlib import Path

import pyro

from pyrovae import distributed
from pyrovae.cli import non_negative_int, parse_key_values, plain, positive_int
from pyrovae.errors import PyrovaeError
from pyrovae.data import (
    BINARIZE_MODES,
    DATASET_NAMES,
    DEFAULT_TEST_SIZE,
    OFFICIAL_VALIDATION,
    STREAM_THRESHOLD_BYTES,
    load_dataset,
)
from pyrovae.families import (
    GUIDES,
    LIKELIHOODS,
    PRIORS,
    check_supports,
    make_guide,
    make_likelihood,
    make_prior,
)
from pyrovae.networks import (
    ACTIVATIONS,
    ARCHITECTURES,
    NETWORKS,
    check_layer_hidden,
    check_network,
    check_z_dims,
    lookup_architecture,
)
from pyrovae.objectives import ESTIMATORS, OBJECTIVES
from pyrovae.run import (
    BEST_CHECKPOINT_FILE,
    BURDA_EPOCHS,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    DIGITS_BATCH_SIZE,
    LR_SCHEDULES,
    METRICS_FILE,
    ModelConfig,
    claim_folder,
    read_config,
    read_train_config,
    resolve_device,
)
from pyrovae.training import Trainer, TrainConfig
from pyrovae.vae import VAE, check_layered_objective

log = logging.getLogger("pyrovae")

MODEL, TRAINING = ModelConfig(), TrainConfig()  # the defaults
D = " (default %(default)s)"  # argparse fills in each flag's default


def add_parser(sub):
    p = sub.add_parser("train", help=plain(__doc__), description=plain(__doc__))
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=TRAINING.dataset, metavar="NAME_OR_PATH",
                      help=f"a data set, {', '.join(DATASET_NAMES)}, or your own data: a "
                           f"folder of PNG or JPEG images, or a .npy, .npz, .pt or .csv file "
                           f"(default %(default)s; see docs/datasets.md)")
    data.add_argument("--data-dir", help="folder with the data files (default: $PYROVAE_DATA_DIR, "
                      "else torchvision downloads mnist and fashion-mnist)")
    data.add_argument("--binarize", choices=BINARIZE_MODES,
                      help="how grey values become 0 or 1, e.g. dynamic: resampled every "
                           "batch (see docs/datasets.md); default: static for binarized-mnist, "
                           "which is already binary, threshold for digits and dynamic for the "
                           "others with --likelihood bernoulli, none for the other "
                           "likelihoods")
    data.add_argument("--val-size", type=count_or_name, default=TRAINING.val_size,
                      metavar="N_OR_OFFICIAL",
                      help=f"hold N training images out as a validation set (drawn with "
                           f"--seed), or {OFFICIAL_VALIDATION}: binarized-mnist's own 10,000 "
                           f"validation images; each epoch then reports the validation ELBO "
                           f"and RUN/{BEST_CHECKPOINT_FILE} keeps the best epoch's weights "
                           f"(default %(default)s: none)")
    own = p.add_argument_group("your own data (with --dataset PATH)")
    own.add_argument("--test", dest="test_data", metavar="PATH",
                     help="the test set, a file or folder like --dataset's (default: "
                          "--test-size of the data)")
    own.add_argument("--test-size", type=fraction_or_count, metavar="FRACTION_OR_COUNT",
                     help=f"the test set drawn from the data with --seed: a fraction (0.1) or "
                          f"a count (500) (default {DEFAULT_TEST_SIZE})")
    own.add_argument("--image-size", type=positive_int, nargs="+", metavar="N",
                     help="resize every image to H W (one N: N x N); needed where the images "
                          "differ in size")
    own.add_argument("--csv-columns", nargs="+", metavar="COLUMN",
                     help="the columns of a .csv file to train on, by name or 0-based number "
                          "(default: all, which must be numeric)")
    own.add_argument("--stream", action=argparse.BooleanOptionalAction,
                     help=f"read an image folder or .npy file from disk batch by batch "
                          f"(DataLoader), or (--no-stream) hold it in memory; default: stream "
                          f"above {STREAM_THRESHOLD_BYTES / 2**30:g} GiB as float32")
    own.add_argument("--num-workers", type=non_negative_int, metavar="N",
                     help="loader processes of a streamed data set (default: the cores but "
                          "one, at most 4)")
    model = p.add_argument_group("model")
    model.add_argument("--prior", default="normal", choices=sorted(PRIORS),
                       help="the prior p(z)" + D)
    model.add_argument("--prior-param", action="append", metavar="KEY=VALUE",
                       help="a prior parameter, e.g. df=3 or scale=0.5, or components=50 "
                            "for mog and vamp (repeatable)")
    model.add_argument("--learn-prior", action="store_true", help="learn the prior's parameters")
    model.add_argument("--guide", default="normal", choices=sorted(GUIDES),
                       help="the guide family q(z|x)" + D)
    model.add_argument("--guide-param", action="append", metavar="KEY=VALUE",
                       help="a guide parameter, e.g. df=5 or learn_df=false for the student-t "
                            "guide, flows=4 or hidden=200,200 for iaf (repeatable)")
    model.add_argument("--likelihood", default="bernoulli", choices=sorted(LIKELIHOODS),
                       help="the likelihood p(x|z)" + D)
    model.add_argument("--likelihood-param", action="append", metavar="KEY=VALUE",
                       help="a likelihood parameter, e.g. scale=0.1 (gaussian-fixed) or "
                            "sigma=per-datapoint (gaussian) (repeatable)")
    model.add_argument("--z-dim", type=positive_int, nargs="+", default=[MODEL.z_dim],
                       metavar="N", help="latent dimensions; one size per stochastic layer, from "
                       "the data upward, for several (Burda et al.'s two layers: --z-dim 100 50) "
                       f"(default {MODEL.z_dim})")
    model.add_argument("--hidden", type=positive_int, nargs="+", action="append", metavar="N",
                       help="hidden layer sizes of the encoder and decoder, e.g. --hidden 500 "
                       "500; with several stochastic layers, once per layer from the data "
                       "upward (--hidden 200 200 --hidden 100 100), or once for all; with "
                       "--network conv, the fully connected layers after the convolutions "
                       f"(default {' '.join(map(str, MODEL.hidden))})")
    model.add_argument("--network", default=MODEL.network, choices=NETWORKS,
                       help="the encoder and decoder: mlp (fully connected) or conv (strided "
                            "convolutions, for images; see docs/networks.md)" + D)
    model.add_argument("--channels", type=positive_int, nargs="+", metavar="N",
                       help="the conv network's channel widths, one per stride-2 "
                            "convolution (default: by the image size, 32 64 for 28x28)")
    model.add_argument("--arch", choices=sorted(ARCHITECTURES),
                       help="a published architecture's sizes (docs/networks.md); the model "
                            "flags given beside it override them")
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
                     help=f"total epochs (default {TRAINING.epochs}, {BURDA_EPOCHS} with "
                          f"--lr-schedule burda; with --resume, the run's own)")
    fit.add_argument("--batch-size", type=int, metavar="N",
                     help=f"training images per step (default {DIGITS_BATCH_SIZE} for digits, "
                          f"else {TRAINING.batch_size})")
    fit.add_argument("--lr", type=float, default=TRAINING.lr,
                     help="Adam learning rate, a positive number; the base of --lr-schedule"
                          + D)
    fit.add_argument("--lr-schedule", default=TRAINING.lr_schedule, choices=LR_SCHEDULES,
                     help=f"the learning rate per epoch: constant; burda: --lr * 10**(-i/7) "
                          f"for 3**i epochs, i = 0 ... 7 (Burda et al. 2016; {BURDA_EPOCHS} "
                          f"epochs, the default --epochs with it); step: times --lr-gamma "
                          f"every --lr-step epochs; cosine: from --lr down towards --lr-min "
                          f"over --epochs" + D)
    fit.add_argument("--lr-step", type=int, metavar="EPOCHS",
                     help="the step schedule's epochs between two decays (needed by "
                          "--lr-schedule step)")
    fit.add_argument("--lr-gamma", type=float, default=TRAINING.lr_gamma,
                     help="the step schedule's factor per decay, in (0, 1]" + D)
    fit.add_argument("--lr-min", type=float, default=TRAINING.lr_min,
                     help="the learning rate the cosine schedule decays to, below --lr" + D)
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
    fit.add_argument("--tensorboard", action="store_true",
                     help="write the metrics and image grids for TensorBoard into "
                          "RUN/tensorboard (pip install 'pyrovae[tensorboard]')")
    fit.add_argument("--iwae-every", type=int, default=TRAINING.iwae_every, metavar="EPOCHS",
                     help="every EPOCHS epochs and in the last, the test set's IWAE bound with "
                          "--iwae-samples samples, with the training time so far, into "
                          "metrics.json; 0: never" + D)
    fit.add_argument("--iwae-samples", type=int, default=TRAINING.iwae_samples, metavar="K",
                     help="importance samples of --iwae-every's bound" + D)
    fit.add_argument("--diagnostics-every", type=int, default=TRAINING.diagnostics_every,
                     metavar="EPOCHS",
                     help="the posterior-collapse diagnostics (active units, KL per dimension, "
                          "I(x; z)) every EPOCHS epochs and in the last" + D)
    fit.add_argument("--time-budget", type=float, metavar="SECONDS",
                     help="end the run after the epoch in which the training steps' time "
                          "reaches SECONDS (the checkpoints and per-epoch evaluations not "
                          "counted); default: every epoch")
    fit.add_argument("--eval-samples", type=positive_int, metavar="K",
                     help="at the end, estimate the test-set log p(x) with K importance samples "
                          "(as pyrovae evaluate; papers use 5000; default: no evaluation)")
    p.set_defaults(run=run)
    return p


def fraction_or_count(text: str):
    """An argparse ``type`` for --test-size: an integer count, or a fraction in (0, 1)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a fraction between 0 and 1 or a count, got {text!r}") from None


def count_or_name(text: str):
    """An argparse ``type`` for --val-size: an integer count, else the word as given
    (``TrainConfig.validate`` names what it accepts)."""
    try:
        return int(text)
    except ValueError:
        return text


def run(args) -> int:
    # under torchrun, join the other processes first: gloo on the CPU, nccl on CUDA (a
    # resumed run's own device, unless --device is given again)
    device = args.device
    if args.resume and args.out and "device" not in getattr(args, "given", ()):
        device = read_train_config(args.out).device
    distributed.init_from_environment(resolve_device(device))
    distributed.quiet_other_ranks(log)
    try:
        with sigterm_as_ctrl_c() as terminated:
            return _train(args, progress=not args.no_progress, terminated=terminated)
    finally:
        distributed.shutdown()


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # the shells' 128 + SIGINT, 128 + SIGTERM


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM, which a batch scheduler (preemption, the end of a time limit) or a
    container's stop sends before it kills, interrupts the training as Ctrl-C does:
    the trainer saves the state in memory as the checkpoint (``interrupted_at_step``).
    Python's default for SIGTERM ends the process at once, losing the epoch in
    progress. Yields a list that holds the signal once it came; a second SIGTERM
    while the checkpoint is written is ignored."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals go to main
        yield received
        return

    def interrupt(signum, frame):
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(args, progress: bool, terminated: list[int]) -> int:
    trainer = resume_trainer(args, progress) if args.resume else build_trainer(args, progress)
    try:
        metrics = trainer.fit()
    except KeyboardInterrupt:  # outside the trainer's own handlers, e.g. while it saved
        log.warning("interrupted outside the steps and the extras; the last checkpoint "
                    "written is kept (checkpoints are written atomically). --resume "
                    "continues from it.")
        trainer.interrupted = True
    if trainer.interrupted:
        # under data-parallel training the trainer held the signal itself (_StopRequests)
        by_sigterm = terminated or trainer.stop_signal == signal.SIGTERM
        return EXIT_TERMINATED if by_sigterm else EXIT_INTERRUPTED
    if trainer.rank != 0:  # rank 0 writes the figures and the evaluation
        return 0
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
        from pyrovae.pipelines import evaluate_test_set  # loads the plots, as above

        evaluate_test_set(trainer.out, trainer.vae, trainer.data, args.eval_samples,
                          seed=trainer.config.seed, progress=progress)
    return 0


# flags of `pyrovae train` that describe the model, and cannot change when a run resumes
MODEL_FLAGS = ("prior", "prior_param", "learn_prior", "guide", "guide_param", "likelihood",
               "likelihood_param", "z_dim", "hidden", "activation", "network", "channels", "arch")
# the flags that size the networks: what an --arch sets, unless given beside it
SIZE_FLAGS = ("z_dim", "hidden", "activation", "network", "channels")
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
    if flag in ("activation", "network", "arch"):
        return value == saved.get(flag, getattr(MODEL, flag))
    if flag in ("z_dim", "hidden", "channels"):
        given = ModelConfig(**{flag: _model_size(flag, value)}).to_dict()[flag]
        return given == saved.get(flag)
    if flag in ("prior", "guide", "likelihood"):
        return value == saved[flag]["name"]
    return False


def _model_size(flag: str, value):
    """A size flag as the VAE takes it: one --z-dim size is an int; one --hidden list is
    every block's, several are one per stochastic layer."""
    if flag == "z_dim":
        return value[0] if len(value) == 1 else tuple(value)
    if flag == "hidden":
        if value is None:
            return MODEL.hidden
        return tuple(value[0]) if len(value) == 1 else tuple(map(tuple, value))
    if flag == "channels":
        return value if value is None else tuple(value)
    return value


def model_sizes(args) -> dict:
    """The VAE's sizes: the --arch's, with the size flags given beside it (or, without an
    --arch, every size flag) in their place."""
    given = getattr(args, "given", set(SIZE_FLAGS))
    sizes = lookup_architecture(args.arch).settings() if args.arch else {}
    for flag in SIZE_FLAGS:
        if flag in given or flag not in sizes:
            sizes[flag] = _model_size(flag, getattr(args, flag))
    return sizes


def build_trainer(args, progress: bool) -> Trainer:
    """The Trainer of a new run. Every flag is checked before the data is loaded,
    except the likelihood's parameters, which need the data's shape."""
    stem = args.dataset if args.dataset in DATASET_NAMES else Path(args.dataset).stem
    # one name for all the processes of a data-parallel run, whose clocks may differ
    out = Path(args.out or distributed.broadcast(
        f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
    config = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, binarize=args.binarize,
                         test_data=args.test_data, test_size=args.test_size,
                         image_size=args.image_size, csv_columns=args.csv_columns,
                         stream=args.stream, num_workers=args.num_workers,
                         tensorboard=args.tensorboard, val_size=args.val_size,
                         elbo=args.elbo, num_particles=args.num_particles,
                         epochs=default_epochs(args.lr_schedule) if args.epochs is None
                         else args.epochs,
                         lr_schedule=args.lr_schedule, lr_step=args.lr_step,
                         lr_gamma=args.lr_gamma, lr_min=args.lr_min,
                         iwae_every=args.iwae_every, iwae_samples=args.iwae_samples,
                         diagnostics_every=args.diagnostics_every,
                         time_budget=args.time_budget,
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
    sizes = model_sizes(args)
    z_dims = check_z_dims(sizes["z_dim"])
    check_layer_hidden(sizes["hidden"], len(z_dims))
    check_network(sizes["network"], sizes["channels"])
    check_layered_objective(len(z_dims), config.elbo, config.estimator)
    prior = _family("--prior-param", "prior", args.prior, make_prior, z_dims[-1], prior_kwargs)
    guide = _family("--guide-param", "guide", args.guide, make_guide, z_dims[0], guide_kwargs)
    if len(z_dims) == 1:  # with several layers, the VAE checks each layer's pair
        check_supports(guide, prior)
    # after every check of the flags (a refused command leaves no folder, and --overwrite
    # clears nothing), before the data load and the training
    with distributed.rank_zero_first():  # only rank 0 writes the run folder
        if distributed.rank() == 0:
            claim_folder(out, args.overwrite)
    binarize = config.resolved_binarize(args.likelihood)
    config.binarize = binarize
    with distributed.rank_zero_first():  # rank 0 fills the cache (extracted files) first
        data = load_dataset(config.dataset, config.data_dir, binarize=binarize,
                            seed=config.seed, **config.data_options())
    _family("--likelihood-param", "likelihood", args.likelihood, make_likelihood, data.x_shape,
            likelihood_kwargs)
    pyro.set_rng_seed(config.seed)  # the networks' initial weights depend on the seed alone
    vae = VAE(data.x_shape, prior=args.prior, guide=args.guide, likelihood=args.likelihood,
              prior_kwargs=prior_kwargs, guide_kwargs=guide_kwargs,
              likelihood_kwargs=likelihood_kwargs, **sizes)
    vae.config["arch"] = args.arch
    log.info(f"{config.dataset}: {len(data.train)} train / {len(data.test)} test images of "
             f"{data.x_shape}, binarize={binarize}; prior={args.prior} guide={args.guide} "
             f"likelihood={args.likelihood} z_dim={vae.z_dim} network={vae.config['network']}"
             f"{' arch=' + args.arch if args.arch else ''} elbo={config.elbo} "
             f"estimator={config.estimator}; "
             f"run folder {out}")
    return Trainer(vae, data, config, out=out, progress=progress, overwrite=args.overwrite)


def default_epochs(lr_schedule: str) -> int:
    """Burda et al.'s schedule is 3280 epochs long; the others run the default epochs."""
    return BURDA_EPOCHS if lr_schedule == "burda" else TRAINING.epochs


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
    if trainer.best is not None:
        log.info(f"best validation ELBO {trainer.best['val_elbo']:.3f} in epoch "
                 f"{trainer.best['epoch']}: its weights are {BEST_CHECKPOINT_FILE} (pyrovae "
                 f"evaluate {trainer.out} --checkpoint best).")
