"""Small command-line pieces the harness tools share."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit status 2 (argparse's usual is the usage too)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def tool_parser(
    prog: str,
    doc: str | None,
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
    **options: Any,
) -> argparse.ArgumentParser:
    """A tool's parser: its module docstring (`doc`), as written, is the --help text."""
    return parser_class(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **options
    )


def positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)
