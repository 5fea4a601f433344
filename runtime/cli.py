"""What the runtime's commands share: errors as one line and a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn


def error_line(prog: str, message: str) -> None:
    """Print ``PROG: error: MESSAGE`` to stderr in one write.

    The ranks of a run share one stderr. Under ``python -u`` (``PYTHONUNBUFFERED``), ``print``
    writes the text and its newline apart, so two ranks failing at once could splice their
    lines into one; a single write of a short line to a pipe or terminal is never split."""
    line = f"{prog}: error: {message}\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream with no descriptor (captured)
        sys.stderr.write(line)
        sys.stderr.flush()
        return
    sys.stderr.flush()
    data = line.encode(errors="replace")
    while data:  # one write unless the line is longer than the pipe takes at once
        data = data[os.write(fd, data) :]


def fail(prog: str, message: str) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` on one line and exit with status 2 (a user error)."""
    error_line(prog, message)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, named after the command (not a subcommand)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(self.prog.split()[0], message)
