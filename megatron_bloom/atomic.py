"""Files that appear whole or not at all: written beside their final name, synced, renamed.

The one writer of single files for the package (checkpoint files, index caches, token sidecars,
resolved configurations) and the data tools. Folders and multi-file datasets are committed by
their own code (a renamed folder, the ``.idx`` moved last). Imports nothing of the package, so
every layer may use it.
"""
from __future__ import annotations

import os
import uuid
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None], unique: bool = False) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then synced and renamed.

    Readers see either the old file or the complete new one, also after a crash: the data is on
    disk (fsync) before the rename makes it visible; a failed write leaves no temporary file.
    ``write`` receives a path, not an open file, because ``torch.save`` names the records inside
    its zip archive after the file it is given; the temporary name ``<path>.tmp.<pid>`` is
    therefore part of the bytes written. ``unique`` adds a random suffix, for files that ranks on
    several nodes (same pid, shared filesystem) may write at once.
    """
    tmp = f"{path}.tmp.{os.getpid()}" + (f".{uuid.uuid4().hex[:8]}" if unique else "")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str, unique: bool = False) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write, unique)


def atomic_write_bytes(path: str, write: Callable, unique: bool = False) -> None:
    """``write(binary file object)`` fills the file."""

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            write(fh)

    atomic_write(path, fill, unique)
