"""Command line: `python -m sd generate "a prompt" ...`, `python -m sd img2img in.png "a prompt" ...`,
`python -m sd train <stage>` and `python -m sd evaluate`.

One parser, one `main`, one error handler. Each command lives in its own module (generate.py, train.py,
evaluate.py), whose `add_parser(sub)` adds it and sets its handler. Every mistake in the arguments, and every
expected error while a command runs, ends the program with one line `python -m sd <command>: error: ...` and
exit code 2 (Ctrl-C: 130, SIGTERM while training: 143); `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import signal
import sys

from . import evaluate, generate, inpaint, train
from .arguments import OneLineParser

PROG = "python -m sd"
COMMANDS = (generate, inpaint, train, evaluate)
# Errors a user can cause (bad input, a missing or unreadable file, no space left): one line, not a traceback.
EXPECTED_ERRORS = (ValueError, TypeError, FileNotFoundError, OSError, FloatingPointError)
USAGE_ERROR = 2           # argparse's exit code for bad arguments, used for every expected error
SIGNAL_EXIT_BASE = 128    # the shell's convention: a process ended by signal N exits with 128 + N (Ctrl-C: 130)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Stable Diffusion v1.x from scratch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        command.add_parser(sub)
    for command_parser in sub.choices.values():
        command_parser.add_argument("--debug", action="store_true",
                                    help="show the full traceback of an error instead of one line")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the command's handler; an expected error becomes one line and an exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (KeyboardInterrupt, *EXPECTED_ERRORS) as e:
        if args.debug:
            raise
        interrupted = isinstance(e, KeyboardInterrupt)
        message = str(e) or ("interrupted (Ctrl-C)" if interrupted else type(e).__name__)
        sys.stderr.write(f"{PROG} {args.command}: error: {message.splitlines()[0]}\n")
        return SIGNAL_EXIT_BASE + getattr(e, "signum", signal.SIGINT) if interrupted else USAGE_ERROR
    return 0
