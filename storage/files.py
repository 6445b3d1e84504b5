"""Durability of the files beside LMDB's own: a directory's entries synced to disk."""

from __future__ import annotations

import os


def sync_dir(path: str | os.PathLike) -> None:
    """fsync the directory `path`, so that the names just made in it (a file, a link, a
    subdirectory) survive a power loss as the data under them does."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
