"""The pruning engine is a layer below the rest: nothing in ``grpo_prune/pruning/`` imports from ``grpo_prune``
outside the engine except :mod:`grpo_prune.fileio` (issue 21: the ``oneshot`` command moved up to
:mod:`grpo_prune.oneshot_cli`, which ended the ``pruning.oneshot`` <-> ``export`` import circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "grpo_prune" / "pruning"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function-level lazy imports included), as absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against grpo_prune.pruning
                base = ["grpo_prune", "pruning"][: 2 - (node.level - 1)]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            else:
                found.append((node.lineno, node.module or ""))
    return found


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda p: p.name)
def test_engine_imports_nothing_above_it_but_fileio(path):
    bad = [
        f"{path.name}:{line} imports {name}"
        for line, name in _imported_modules(path)
        if name.split(".")[0] == "grpo_prune"
        and not name.startswith("grpo_prune.pruning")
        and name != "grpo_prune.fileio"
    ]
    assert not bad, bad


def test_engine_import_pulls_in_no_higher_module():
    """Importing the whole engine (one-shot pruning included) loads no grpo_prune module outside it but fileio."""
    code = (
        "import sys, grpo_prune.pruning.oneshot, grpo_prune.pruning.pruner\n"
        "print(sorted(m for m in sys.modules if m.startswith('grpo_prune.') and not m.startswith('grpo_prune.pruning')"
        " and m != 'grpo_prune.fileio'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_oneshot_command_lives_above_the_engine():
    import grpo_prune.pruning.oneshot as engine
    from grpo_prune.oneshot_cli import main

    assert not hasattr(engine, "main") and callable(main)
