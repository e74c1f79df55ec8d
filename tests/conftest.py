"""Fixtures shared by several test modules (helpers that are plain functions live in tests/tiny.py)."""

import pytest
from tiny import char_tokenizer, tiny_model


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A folder holding the tiny model and its character tokenizer, as a command-line run loads them."""
    path = tmp_path / "tiny-model"
    tiny_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
