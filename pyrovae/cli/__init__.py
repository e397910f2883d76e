"""The ``pyrovae`` command: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pyrovae.errors import NonFiniteLossError, PyrovaeError

SUBCOMMANDS = ("train", "evaluate", "plot")


def main(argv=None) -> int:
    # files only, and there may be no display; a backend the user chose stands
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = argparse.ArgumentParser(prog="pyrovae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"pyrovae.cli.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    try:
        return args.run(args) or 0
    except (PyrovaeError, NonFiniteLossError) as error:
        # bad input is the user's to fix: the message says how, a traceback would bury it
        print(f"pyrovae {args.command}: error: {error}", file=sys.stderr)
        return 2


def parse_key_values(pairs: list[str] | None, flag: str) -> dict:
    """``["df=3", "learnable=true"]`` -> ``{"df": 3.0, "learnable": True}``."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} takes KEY=VALUE, got {pair!r}.")
        out[key.replace("-", "_")] = _parse_value(value)
    return out


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        return text
