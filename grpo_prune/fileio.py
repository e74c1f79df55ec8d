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

__all__ = ["atomic_write", "default_mode", "relax_private_modes", "write_json_atomic", "write_text_atomic"]


def default_mode(directory: bool = False) -> int:
    """Permission bits a plain ``open(path, "w")`` (0644 under the usual umask 022) or ``os.mkdir`` (0755) gives.

    ``tempfile`` creates private files (0600) and folders (0700); files renamed into place from there would keep
    those modes, and another user (or a container running as another uid) could not read the model.
    """
    umask = _read_umask()
    return (0o777 if directory else 0o666) & ~umask


def _read_umask() -> int:
    try:  # Linux reports it without changing it (os.umask would briefly set it for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then restore it at once
    os.umask(umask)
    return umask


def relax_private_modes(folder: str | os.PathLike[str], recursive: bool = True) -> None:
    """Give the private files (0600) and folders (0700) under ``folder`` the modes ``open``/``mkdir`` would.

    ``safetensors.torch.save_file`` (used by ``save_pretrained``) and ``tempfile`` create files readable by their
    owner only. Other modes (set on purpose by someone) are left alone; symbolic links are not followed.
    """
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    for root, dirs, files in os.walk(folder):
        for names, private, mode in ((dirs, 0o700, dir_mode), (files, 0o600, file_mode)):
            for name in names:
                path = os.path.join(root, name)
                st = os.lstat(path)
                if not os.path.islink(path) and st.st_mode & 0o777 == private and mode != private:
                    os.chmod(path, mode)
        if not recursive:
            break


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary file lives in the same folder, so the rename is atomic; it is removed if ``write`` fails. Missing
    parent folders are created. The file gets the mode ``open()`` would give it (:func:`default_mode`), not
    ``mkstemp``'s private 0600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        # After `write`: a writer may have replaced the temporary file rather than written into it.
        os.chmod(tmp, default_mode())
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
