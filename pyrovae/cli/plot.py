"""``pyrovae plot RUN``: write the figures of a saved run into its folder RUN."""

from __future__ import annotations

import logging
from pathlib import Path

from pyrovae.cli import plain, seed_int
from pyrovae.run import check_writable, read_metrics
from pyrovae.vae import load_run

log = logging.getLogger("pyrovae")


def add_parser(sub):
    p = sub.add_parser("plot", help=plain(__doc__), description=plain(__doc__) + (
        " The figures and their file names are listed in docs/figures.md."))
    p.add_argument("run_folder", metavar="RUN",
                   help="the run folder, as written by pyrovae train --out RUN")
    p.add_argument("--data-dir", help="where the data set is now, if not where config.json says "
                                      "(default: the run's)")
    p.add_argument("--seed", type=seed_int,
                   help="chooses the test images shown, 0 to 2**32 - 1 (default: the run's seed)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from pyrovae.plots import write_figures  # matplotlib loads only for this subcommand

    folder = Path(args.run_folder)
    vae, data, config = load_run(folder, args.data_dir)
    check_writable(folder)
    metrics = read_metrics(folder)
    seed = config.seed if args.seed is None else args.seed
    written = write_figures(folder, vae, data, metrics, seed=seed)
    log.info(f"wrote {len(written)} figures in {folder}: {', '.join(p.name for p in written)}")
    return 0
