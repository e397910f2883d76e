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
from pyrovae.evaluation.marginal import (
    DEFAULT_MAX_ELEMENTS,
    IWAE_CURVE_KS,
    MIN_SAMPLES_FOR_KHAT,
    iwae_bounds,
    log_likelihood,
)
from pyrovae.plots import IWAE_FIGURE, KHAT_FIGURE, plot_iwae_bounds, plot_khat, save
from pyrovae.run import EVALUATION_FILE
from pyrovae.vae import load_run

log = logging.getLogger("pyrovae")


def evaluate_run(run_folder, num_samples: int = 5000, *, max_elements: int = DEFAULT_MAX_ELEMENTS,
                 num_images: int | None = None, subset_size: int = 100, seed: int = 0,
                 device: str = "auto", data_dir: str | None = None,
                 progress: bool = True) -> dict:
    """Evaluate a run folder's test set: write evaluation.json and two figures; return the summary.

    Reloads the VAE from ``config.json`` and ``checkpoint.pt`` and the data set
    it was trained on (same binarization: for dynamic binarization, the test set
    binarized once with the run's seed). ``num_images`` keeps the first test
    images only. The IWAE-bound curve uses the first ``subset_size`` of them,
    with max(num_samples, 5000) samples. Figures: ``evaluation_khat.png``
    (k-hat per datapoint) and ``evaluation_iwae_bound.png``.
    """
    folder = Path(run_folder)
    vae, data, _ = load_run(folder, data_dir, run.resolve_device(device))
    run.check_writable(folder)  # before the evaluation, not after it
    return evaluate_test_set(folder, vae, data, num_samples, max_elements=max_elements,
                             num_images=num_images, subset_size=subset_size, seed=seed,
                             progress=progress)


def evaluate_test_set(folder, vae, data, num_samples: int = 5000, *,
                      max_elements: int = DEFAULT_MAX_ELEMENTS, num_images: int | None = None,
                      subset_size: int = 100, seed: int = 0, progress: bool = True) -> dict:
    """``evaluate_run`` for a VAE and data set already in memory (the end of training)."""
    folder = Path(folder)
    test = data.test if num_images is None else data.test[:num_images]
    log.info(f"evaluating {folder}: log p(x) of {len(test)} {data.name} test images "
             f"with K={num_samples} importance samples on {vae.device}")
    estimate = log_likelihood(vae, test, num_samples, max_elements=max_elements, seed=seed,
                              progress=progress)
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
    return summary
