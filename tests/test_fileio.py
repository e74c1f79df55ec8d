"""Atomic writers leave files and folders with the modes a plain open()/mkdir would, under the process umask."""

import os
import stat

import pytest
from safetensors.torch import save_file
from tiny import tiny_model

from grpo_prune.fileio import atomic_write, default_mode, relax_private_modes, write_json_atomic, write_text_atomic
from grpo_prune.models import write_dir_atomically


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_default_mode_follows_umask(umask):
    assert default_mode() == 0o666 & ~umask
    assert default_mode(directory=True) == 0o777 & ~umask


def test_atomic_files_have_open_modes(tmp_path, umask):
    write_json_atomic(tmp_path / "report.json", {"a": 1})
    write_text_atomic(tmp_path / "notes.txt", "hi")
    # safetensors writes 0600 files on its own; the atomic writer still ends with the usual mode.
    import torch

    atomic_write(tmp_path / "state.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, tmp))
    (tmp_path / "plain.txt").write_text("reference")
    for name in ("report.json", "notes.txt", "state.safetensors"):
        assert mode(tmp_path / name) == mode(tmp_path / "plain.txt") == 0o666 & ~umask, name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_atomic_folder_has_mkdir_modes(tmp_path, umask):
    def write(folder):
        tiny_model().save_pretrained(folder)  # transformers' model.safetensors is 0600 by itself
        (folder / "sub").mkdir()
        (folder / "sub" / "x.txt").write_text("x")

    out = write_dir_atomically(tmp_path / "model", write)
    assert mode(out) == 0o777 & ~umask
    assert mode(out / "sub") == 0o777 & ~umask
    for name in ("model.safetensors", "config.json", "sub/x.txt"):
        assert mode(out / name) == 0o666 & ~umask, name


def test_relax_private_modes_keeps_deliberate_modes(tmp_path):
    private, script = tmp_path / "private.bin", tmp_path / "run.sh"
    private.write_text("p")
    script.write_text("s")
    private.chmod(0o600)
    script.chmod(0o750)
    relax_private_modes(tmp_path)
    assert mode(private) == default_mode()
    assert mode(script) == 0o750
