"""Atomic file writes: a crash or Ctrl-C mid-write leaves the previous file whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Callable

import torch


def atomic_write(path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, flush it
    to disk, then rename it over ``path`` (a rename is atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))
