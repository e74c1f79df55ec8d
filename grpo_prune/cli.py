"""Command line entry point: ``grpo-prune train | eval | export``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-prune",
        description="Prune and distil a language model while it is post-trained with GRPO (MAMA pruning).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export}")
    sub.add_parser("train", help="GRPO training with MAMA pruning and distillation from a YAML config.", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, _ = parser.parse_known_args(argv[:1])
    parser.error(f"the '{args.command}' command is not available in this version")
    return 2


if __name__ == "__main__":
    sys.exit(main())
