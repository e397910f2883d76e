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
    parser = argparse.ArgumentParser(prog="pyrovae", description=plain(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"pyrovae.cli.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    args.given = given_flags(sub.choices[args.command], sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    try:
        return args.run(args) or 0
    except (PyrovaeError, NonFiniteLossError) as error:
        # bad input is the user's to fix: the message says how, a traceback would bury it
        print(f"pyrovae {args.command}: error: {error}", file=sys.stderr)
        return 2


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line, whatever their
    value: a resumed run applies ``--lr 0.001`` even where 0.001 is the default."""
    options = {option: action.dest for action in parser._actions  # argparse keeps them there
               for option in action.option_strings if option.startswith("--")}
    given = set()
    for word in (word.split("=", 1)[0] for word in argv if word.startswith("--")):
        # the whole name, or the unique prefix argparse accepted (--kl-anneal is not
        # --kl-anneal-start)
        named = [word] if word in options else [o for o in options if o.startswith(word)]
        given.update(options[option] for option in named)
    return given


def parse_key_values(pairs: list[str] | None, flag: str) -> dict:
    """``["df=3", "learnable=true"]`` -> ``{"df": 3.0, "learnable": True}``.

    The values' ranges are the family's to check (it names the parameter); this
    refuses only what is not KEY=VALUE, or a KEY given twice."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value:
            raise PyrovaeError(f"{flag} takes KEY=VALUE, e.g. {flag} scale=0.5; got {pair!r}.")
        if key in out:
            raise PyrovaeError(f"{flag} {key} is given twice ({key}={out[key]!r} and {pair!r}); "
                               f"give it once.")
        out[key] = _parse_value(value)
    return out


def plain(doc: str) -> str:
    """A docstring as --help text: without the RST backticks."""
    return doc.replace("``", "").replace("`", "")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (a count, a size)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 0."""
    return _int_at_least(text, 0, "a non-negative integer")


def seed_int(text: str) -> int:
    """An argparse ``type``: a seed, 0 to 2**32 - 1 (numpy's range)."""
    value = _int_at_least(text, 0, "an integer from 0 to 2**32 - 1")
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**32 - 1, got {text!r}")
    return value


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        return text
