"""How the command line reports a user's mistake: one line on stderr, exit code 2, with a "did you mean" hint.

Every subcommand (``train``, ``eval``, ``export``) reports the same way: ``grpo-prune <command>: error: <message>``,
where the message names the field or flag as the user wrote it and the allowed values. `grpo_prune.cli.main` turns
the exceptions in :data:`USER_ERRORS` into that line; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

#: Exit status of every usage or configuration error (argparse's own convention).
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command-line or config-file mistake; the message is shown as is, on one line."""


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (newlines and runs of spaces collapsed), or its type when it has none."""
    text = " ".join(str(err).split())
    if isinstance(err, KeyError) and text.startswith("'"):  # KeyError quotes its message
        text = text.strip("'")
    return text or type(err).__name__


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean `prefix+match`?"`` for the closest of ``choices`` (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{prefix}{close[0]}`?" if close else ""


class OneLineArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (no usage block) and suggest a close flag."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_arguments_message(unknown, self._option_string_actions))
        return parsed


def unknown_arguments_message(unknown: Sequence[str], options: Iterable[str]) -> str:
    """Message for tokens argparse did not use: the first unknown flag with a suggestion, or the stray values."""
    options = [o for o in options if o.startswith("--")]
    flags = [u for u in unknown if u.startswith("-")]
    if flags:
        flag = flags[0].split("=", 1)[0]
        return f"unknown option `{flag}`{did_you_mean(flag, options)} (`--help` lists the options)"
    return f"unexpected argument(s) {' '.join(map(repr, unknown))}"
