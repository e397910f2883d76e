"""``pyrovae plot RUN_FOLDER``: write the figures of a saved run into its folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pyrovae.data import load_dataset
from pyrovae.training import METRICS_FILE, TrainConfig
from pyrovae.vae import CONFIG_FILE, VAE

log = logging.getLogger("pyrovae")


def add_parser(sub):
    p = sub.add_parser("plot", help=__doc__, description=__doc__ + (
        " The figures and their file names are listed in docs/figures.md."))
    p.add_argument("run_folder", help="a folder written by `pyrovae train`")
    p.add_argument("--data-dir", help="where the data set is now, if not where config.json says")
    p.add_argument("--seed", type=int, help="chooses the test images shown (default: the run's seed)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from pyrovae.plots import write_figures  # matplotlib loads only for this subcommand

    folder = Path(args.run_folder)
    if not (folder / CONFIG_FILE).exists():
        raise SystemExit(f"{folder} holds no {CONFIG_FILE}; pass a run folder written by "
                         f"`pyrovae train`.")
    vae, data, config = load_run(folder, args.data_dir)
    metrics_path = folder / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else []
    seed = config.seed if args.seed is None else args.seed
    written = write_figures(folder, vae, data, metrics, seed=seed)
    log.info(f"wrote {len(written)} figures in {folder}: {', '.join(p.name for p in written)}")
    return 0


def load_run(folder: Path, data_dir: str | None = None):
    """The trained VAE, its data set (as training loaded it) and its TrainConfig."""
    saved = json.loads((folder / CONFIG_FILE).read_text())
    config = TrainConfig(**saved["training"])
    if data_dir is not None:
        config.data_dir = data_dir
    vae = VAE.load(folder)
    data = load_dataset(config.dataset, config.data_dir,
                        binarize=config.resolved_binarize(saved["model"]["likelihood"]["name"]),
                        seed=config.seed)
    return vae, data, config
