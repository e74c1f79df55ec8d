"""Atomic file writes: a crash or an interrupt leaves either the old file or the new one, never a truncated one.

Folders (checkpoints, exported models, the converted embedded model) are written the same way by
:func:`grpo_prune.models.write_dir_atomically`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

__all__ = ["atomic_write", "write_json_atomic", "write_text_atomic"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary file lives in the same folder, so the rename is atomic; it is removed if ``write`` fails. Missing
    parent folders are created.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, default: Callable[[Any], Any] | None = str) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; ``default`` converts what JSON cannot hold."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n")
