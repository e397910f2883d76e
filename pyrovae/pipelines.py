"""Run-level evaluation: a trained run's test set, through the estimator, into its folder.

Kept apart from the estimator (``pyrovae.evaluation.marginal``) and the
figures (``pyrovae.plots``), which this puts together with the run folder
(``pyrovae.run``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pyrovae import run
from pyrovae.collapse import collapse_diagnostics
from pyrovae.errors import PyrovaeError
from pyrovae.evaluation.ais import ais_log_likelihood, bdmc
from pyrovae.evaluation.marginal import (
    DEFAULT_DATA_BLOCK,
    DEFAULT_MAX_ELEMENTS,
    IWAE_CURVE_KS,
    MIN_SAMPLES_FOR_KHAT,
    iwae_bounds,
    log_likelihood,
)
from pyrovae.plots import IWAE_FIGURE, KHAT_FIGURE, plot_iwae_bounds, plot_khat, save
from pyrovae.run import AIS_FILE, BDMC_FILE, EVALUATION_FILE
from pyrovae.vae import VAE, load_run

log = logging.getLogger("pyrovae")

METHODS = ("is", "ais", "bdmc")
# importance samples (IS), or chains per datapoint (AIS, BDMC), where none are asked for
DEFAULT_NUM_SAMPLES = {"is": 5000, "ais": 16, "bdmc": 16}
# the weights a run can be evaluated with: run.CHECKPOINTS
CHECKPOINT_CHOICES = tuple(run.CHECKPOINTS)
# above this share of images with k-hat > 0.7, the IS estimate is not to be trusted
# and the summary recommends AIS
AIS_ADVICE_SHARE = 0.1


def load_vae(folder, which: str = "last", map_location="cpu") -> VAE:
    """A run's VAE with the weights of its last checkpoint (checkpoint.pt) or, with
    ``which="best"``, of the epoch with the best validation ELBO (best.pt, written by a
    run trained with a validation set); in eval mode."""
    vae = VAE.load(folder, map_location=map_location)
    _use_checkpoint(vae, folder, which, map_location)
    return vae


def load_run_checkpoint(folder, which: str = "last", data_dir: str | None = None,
                        device="cpu"):
    """``pyrovae.vae.load_run`` (the VAE, its data and its TrainConfig) with the weights
    of checkpoint ``which`` ("last" or "best", as ``load_vae``), and their description
    for a summary: ``{"checkpoint": which, "checkpoint_epoch": epoch}``."""
    vae, data, config = load_run(folder, data_dir, device)
    epoch = _use_checkpoint(vae, folder, which, device)
    return vae, data, config, {"checkpoint": which, "checkpoint_epoch": epoch}


def _use_checkpoint(vae: VAE, folder, which: str, map_location) -> int | None:
    """Put checkpoint ``which``'s weights into ``vae``, loaded with the last ones (those
    are already there); return the checkpoint's epoch."""
    state = run.read_checkpoint(folder, map_location, which=which)
    if which != "last":
        vae.load_state_dict(state["model"])
    return state.get("epoch")


def evaluate_run(run_folder, num_samples: int | None = None, *, method: str = "is",
                 num_steps: int = 1000, leapfrog_steps: int = 10, num_simulated: int = 100,
                 max_elements: int = DEFAULT_MAX_ELEMENTS,
                 data_block: int = DEFAULT_DATA_BLOCK, num_images: int | None = None,
                 subset_size: int = 100, seed: int = 0, device: str = "auto",
                 data_dir: str | None = None, progress: bool = True,
                 checkpoint: str = "last") -> dict:
    """Evaluate a run folder's test set: write evaluation.json and two figures; return the summary.

    Reloads the VAE from ``config.json`` and ``checkpoint.pt`` (``checkpoint="best"``:
    ``best.pt``, the best validation epoch's weights) and the data set it was trained
    on (same binarization: for dynamic binarization, the test set binarized once with
    the run's seed); the summary names the checkpoint and its epoch (``checkpoint``,
    ``checkpoint_epoch``). ``num_images`` keeps the first test
    images only. The IWAE-bound curve uses the first ``subset_size`` of them,
    with max(num_samples, 5000) samples. Figures: ``evaluation_khat.png``
    (k-hat per datapoint) and ``evaluation_iwae_bound.png``.
    """
    if method not in METHODS:
        raise PyrovaeError(f"unknown method {method!r}; use one of {list(METHODS)}.")
    num_samples = DEFAULT_NUM_SAMPLES[method] if num_samples is None else num_samples
    folder = Path(run_folder)
    vae, data, _, weights = load_run_checkpoint(folder, checkpoint, data_dir,
                                                run.resolve_device(device))
    run.check_writable(folder)  # before the evaluation, not after it
    if method == "ais":
        return evaluate_test_set_ais(folder, vae, data, num_steps, num_samples,
                                     leapfrog_steps=leapfrog_steps, max_elements=max_elements,
                                     data_block=data_block, num_images=num_images, seed=seed,
                                     progress=progress, weights=weights)
    if method == "bdmc":
        return evaluate_bdmc(folder, vae, num_simulated, num_steps, num_samples,
                             leapfrog_steps=leapfrog_steps, max_elements=max_elements,
                             data_block=data_block, seed=seed, progress=progress,
                             weights=weights)
    return evaluate_test_set(folder, vae, data, num_samples, max_elements=max_elements,
                             data_block=data_block, num_images=num_images,
                             subset_size=subset_size, seed=seed, progress=progress,
                             weights=weights)


def evaluate_test_set(folder, vae, data, num_samples: int = 5000, *,
                      max_elements: int = DEFAULT_MAX_ELEMENTS,
                      data_block: int = DEFAULT_DATA_BLOCK, num_images: int | None = None,
                      subset_size: int = 100, seed: int = 0, progress: bool = True,
                      weights: dict | None = None) -> dict:
    """``evaluate_run`` for a VAE and data set already in memory (the end of training);
    ``weights`` describes which checkpoint's they are, for the summary."""
    folder = Path(folder)
    test = data.test if num_images is None else data.test[:num_images]
    log.info(f"evaluating {folder}: log p(x) of {len(test)} {data.name} test images "
             f"with K={num_samples} importance samples on {vae.device}")
    estimate = log_likelihood(vae, test, num_samples, max_elements=max_elements,
                              data_block=data_block, seed=seed, progress=progress)
    summary = estimate.summary()
    summary.update(collapse_diagnostics(vae, test, seed=seed, mi_points=2000))
    subset = test[:subset_size]
    curve_samples = max(num_samples, max(IWAE_CURVE_KS))
    curve = log_likelihood(vae, subset, curve_samples, max_elements=max_elements, seed=seed,
                           keep_log_weights=True)
    bounds = iwae_bounds(curve.log_weights)
    summary.update(
        dataset=data.name,
        iwae_bound_subset_size=len(subset),
        iwae_bound={str(k): v for k, v in bounds.items()},
        figures=[KHAT_FIGURE, IWAE_FIGURE],
        # per image, so that two evaluations of the same images compare pairwise
        per_datapoint_log_px=estimate.log_px.tolist(),
        per_datapoint_khat=estimate.khat.tolist(),
        **(weights or {}),
    )
    run.write_evaluation(folder, summary)
    save(plot_khat(estimate.khat.numpy(), num_samples), folder / KHAT_FIGURE)
    save(plot_iwae_bounds(bounds, len(subset), data.name), folder / IWAE_FIGURE)
    log.info(f"NLL {summary['nll']:.3f} +- {summary['nll_se']:.3f} nats (ELBO "
             f"{summary['elbo']:.3f}), mean ESS {summary['ess_mean']:.1f} of {num_samples}, "
             + (f"k-hat > 0.7 for {100 * summary['khat_frac_above_0_7']:.1f}% of images. "
                if num_samples >= MIN_SAMPLES_FOR_KHAT else
                f"no k-hat: it needs K >= {MIN_SAMPLES_FOR_KHAT} importance samples. ")
             + "Wrote "
             f"{EVALUATION_FILE}, {KHAT_FIGURE}, {IWAE_FIGURE} in {folder}.")
    share = summary["khat_frac_above_0_7"]
    if num_samples >= MIN_SAMPLES_FOR_KHAT and share > AIS_ADVICE_SHARE:
        log.info(f"k-hat > 0.7 for {100 * share:.0f}% of the images: q(z|x) is too poor a "
                 f"proposal there, and the NLL above can be far too high. Certify it with "
                 f"annealed importance sampling on a subset: pyrovae evaluate {folder} "
                 f"--method ais --num-images 1000 (docs/marginal_likelihood.md).")
    return summary


def evaluate_test_set_ais(folder, vae, data, num_steps: int = 1000, num_samples: int = 16, *,
                          leapfrog_steps: int = 10, max_elements: int = DEFAULT_MAX_ELEMENTS,
                          data_block: int = DEFAULT_DATA_BLOCK,
                          num_images: int | None = None, seed: int = 0,
                          progress: bool = True, weights: dict | None = None) -> dict:
    """log p(x) of the test images by AIS (``pyrovae.evaluation.ais``): write
    evaluation_ais.json into ``folder`` and return its summary."""
    folder = Path(folder)
    test = data.test if num_images is None else data.test[:num_images]
    log.info(f"evaluating {folder}: log p(x) of {len(test)} {data.name} test images by AIS, "
             f"{num_samples} chains of {num_steps} steps ({leapfrog_steps} leapfrog steps "
             f"each) per image, on {vae.device}")
    estimate = ais_log_likelihood(vae, test, num_steps, num_samples,
                                  leapfrog_steps=leapfrog_steps, max_elements=max_elements,
                                  data_block=data_block, seed=seed, progress=progress)
    summary = {**estimate.summary(), "method": "ais", "leapfrog_steps": leapfrog_steps,
               "dataset": data.name, "per_datapoint_log_px": estimate.log_px.tolist(),
               **(weights or {})}
    run.write_evaluation(folder, summary, AIS_FILE)
    log.info(f"AIS NLL {summary['nll']:.3f} +- {summary['nll_se']:.3f} nats (Monte Carlo SE "
             f"{summary['nll_mc_se']:.3f}), mean ESS {summary['ess_mean']:.1f} of "
             f"{num_samples} chains, acceptance {summary['acceptance_rate']:.2f}; a stochastic "
             f"lower bound of log p(x). Wrote {AIS_FILE} in {folder}.")
    return summary


def evaluate_bdmc(folder, vae, num_simulated: int = 100, num_steps: int = 1000,
                  num_samples: int = 16, *, leapfrog_steps: int = 10,
                  max_elements: int = DEFAULT_MAX_ELEMENTS,
                  data_block: int = DEFAULT_DATA_BLOCK, seed: int = 0,
                  progress: bool = True, weights: dict | None = None) -> dict:
    """BDMC (``pyrovae.evaluation.ais.bdmc``) on data simulated from the run's model:
    write bdmc.json into ``folder`` and return its summary."""
    folder = Path(folder)
    log.info(f"BDMC of {folder}: {num_simulated} datapoints simulated from the model, "
             f"{num_samples} chains of {num_steps} steps each way")
    result = bdmc(vae, num_simulated, num_steps, num_samples, leapfrog_steps=leapfrog_steps,
                  max_elements=max_elements, data_block=data_block, seed=seed,
                  progress=progress)
    summary = {
        **result["summary"], "method": "bdmc", "leapfrog_steps": leapfrog_steps,
        "certifies": "the accuracy of AIS and IS on data simulated from the model, not on "
                     "the test set",
        **{f"per_datapoint_{key}": result[key].tolist()
           for key in ("lower", "upper", "gap", "is")},
        **(weights or {}),
    }
    run.write_evaluation(folder, summary, BDMC_FILE)
    log.info(f"BDMC: log p(x) between {summary['lower']:.3f} (forward AIS) and "
             f"{summary['upper']:.3f} (reverse AIS), gap {summary['gap']:.3f} nats; IS with "
             f"the guide {summary['is']:.3f}. This certifies the estimators on data from the "
             f"model, not on the test set. Wrote {BDMC_FILE} in {folder}.")
    return summary
