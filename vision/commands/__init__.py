"""`tessera` subcommands implemented by the vision stage (each exposes add_arguments and run)."""

from __future__ import annotations

import os
from pathlib import Path


def output_problem(path: str) -> str | None:
    """Why the file `--out PATH` could not be written, checked before any work: a directory there, a
    parent that is missing or not a directory, or an existing file (for a new one, its folder) this user
    cannot write to; None if it can be."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        return f"--out {path} is a directory; give a file name such as {target / 'out.npy'}"
    if not parent.exists():
        return f"--out {path}: the directory {parent} does not exist"
    if not parent.is_dir():
        return f"--out {path}: {parent} is not a directory"
    if not os.access(target if target.exists() else parent, os.W_OK):  # an existing file: its own permission
        return f"--out {path}: not writable by this user"
    return None
