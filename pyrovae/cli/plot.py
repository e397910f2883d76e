"""``pyrovae plot RUN_FOLDER``: write the figures of a saved run into its folder."""

from __future__ import annotations

import logging
from pathlib import Path

from pyrovae.run import read_metrics
from pyrovae.vae import load_run

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
    vae, data, config = load_run(folder, args.data_dir)
    metrics = read_metrics(folder)
    seed = config.seed if args.seed is None else args.seed
    written = write_figures(folder, vae, data, metrics, seed=seed)
    log.info(f"wrote {len(written)} figures in {folder}: {', '.join(p.name for p in written)}")
    return 0
