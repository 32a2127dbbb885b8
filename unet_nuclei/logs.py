"""Where the package's messages go: ``logging``, configured by the programs, never by the library.

Each module that reports something has ``log = logging.getLogger(__name__)``: progress lines (the data,
the run folder, the validation scores) are ``log.info``, details for ``-v`` are ``log.debug``, and the
samples skipped are ``log.warning``.  Importing the package adds no handler and sets no level, so a
program that uses it decides what is shown; with nothing configured, Python shows warnings only.

Train.py and Predict_mask.py call ``to_console`` once in ``main`` (``-q``: warnings and errors only;
``-v``: debug lines too); the notebook calls ``show_progress()`` in its imports cell, to see the
progress lines of ``training.train`` as before.  Keras's own output during training (the progress bar,
or one line per epoch) follows the same setting: it is shown when the ``unet_nuclei`` logger lets
INFO through (``training.keras_verbosity``).
"""

from __future__ import annotations

import argparse
import logging
import sys

PACKAGE = "unet_nuclei"


class ConsoleHandler(logging.Handler):
    """Records below WARNING to stdout, the others to stderr, each as its bare message (the lines look
    as they did when they were printed), flushed at once.  The stream is looked up at every record, so
    a replaced ``sys.stdout`` (a notebook cell, ``contextlib.redirect_stdout``) gets the lines written
    after it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A script's ``-q/--quiet`` and ``-v/--verbose`` (one or the other), in an argument group "output"."""
    output = parser.add_argument_group("output").add_mutually_exclusive_group()
    output.add_argument(
        "-q", "--quiet", action="store_true", help="print warnings and errors only: no progress lines or bars"
    )
    output.add_argument("-v", "--verbose", action="store_true", help="print debug lines too")


def level_from_flags(quiet: bool = False, verbose: bool = False) -> int:
    """The level of a script's ``-q`` (WARNING) and ``-v`` (DEBUG) flags; INFO without either."""
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


def to_console(level: int = logging.INFO, *names: str) -> None:
    """Show the messages of the package, and of the loggers ``names`` (a script's own), at ``level`` and
    above on the console (``ConsoleHandler``).  Calling it again replaces what an earlier call set up, so
    it is safe in a notebook cell that runs twice, or in a test that calls a script's ``main`` twice.
    Records still propagate to the root logger (pytest's ``caplog`` sees them); a program that also
    configures the root logger with a handler gets them there too."""
    for name in (PACKAGE, *names):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
            logger.removeHandler(handler)
        logger.addHandler(ConsoleHandler())
        logger.setLevel(level)


def show_progress() -> None:
    """For a notebook or an interactive session: show the package's progress lines (INFO) on stdout and
    its warnings on stderr, as ``training.train`` printed them before it used ``logging``."""
    to_console(logging.INFO)
