"""What the runtime's commands share: errors as one line and a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def fail(prog: str, message: str) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` on one line and exit with status 2 (a user error)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, named after the command (not a subcommand)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(self.prog.split()[0], message)
